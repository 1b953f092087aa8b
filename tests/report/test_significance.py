"""Paired tests, Holm, Friedman/Nemenyi and their place in `cbmir-report` (docs/statistics.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scikit_posthocs as sp
from scipy import stats

from cbmir.errors import DataError
from cbmir.report import significance as sig
from cbmir.report.build import build_report
from cbmir.report.cli import main as report_main
from tests.helpers import compose_config


# -- the statistics ----------------------------------------------------------------------------
def test_a_known_margin_is_found_and_sized() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, size=400)
    better = base + 0.04 + rng.normal(0, 0.05, size=400)  # better by 0.04 per query
    same = base + rng.normal(0, 0.05, size=400)
    diff, low, high = sig.paired_bootstrap(better, base)
    assert low < 0.04 < high and low > 0  # the interval holds the margin, not 0
    assert diff == pytest.approx(0.04, abs=0.01)
    assert sig.sign_flip_pvalue(better, base, n_permutations=2000) < 0.01
    pairs = sig.pairwise_tests({"A": better, "B": base, "C": same}, n_permutations=2000)
    means = {"A": better.mean(), "B": base.mean(), "C": same.mean()}
    best, tied = sig.top_group(means, pairs)
    assert best == "A" and tied == []  # both others are significantly worse
    assert not bool(pairs.query("a == 'B' and b == 'C'")["significant"].iloc[0])


def test_same_distribution_false_positive_rate_stays_at_the_nominal_level() -> None:
    """300 pairs of extractors whose per-query hits come from one distribution: the test
    rejects at most 5% + 3 binomial standard deviations of them."""
    rng = np.random.default_rng(1)
    n_sim, alpha = 300, 0.05
    rejected = rejected_ci = 0
    for i in range(n_sim):
        x = (rng.uniform(size=80) < 0.6).astype(float)  # hit or miss, as ACC@1
        y = (rng.uniform(size=80) < 0.6).astype(float)
        rejected += sig.sign_flip_pvalue(x, y, n_permutations=500, seed=i) < alpha
        _, low, high = sig.paired_bootstrap(x, y, n_resamples=400, seed=i)
        rejected_ci += not low <= 0 <= high
    slack = 3 * np.sqrt(alpha * (1 - alpha) / n_sim)
    assert rejected / n_sim <= alpha + slack
    assert rejected_ci / n_sim <= alpha + slack
    assert rejected > 0  # the test can reject at all (it is not vacuous)


def test_sign_flip_is_exact_for_few_queries() -> None:
    # differences 1, 2, 3: only all-plus and all-minus reach |sum| = 6, so p = 2 / 8
    assert sig.sign_flip_pvalue(np.array([1.0, 2, 3]), np.zeros(3)) == 0.25
    # 1, 1, -1: |sum| >= 1 for every sign vector
    assert sig.sign_flip_pvalue(np.array([1.0, 1, -1]), np.zeros(3)) == 1.0
    assert sig.sign_flip_pvalue(np.ones(5), np.ones(5)) == 1.0  # no difference at all


def test_holm_against_a_hand_computed_example() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    adjusted = sig.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(sig.holm([0.5, 0.9]), [1.0, 1.0])


def test_friedman_and_nemenyi_equal_scipy_and_scikit_posthocs() -> None:
    rng = np.random.default_rng(2)
    names = ["VGG19", "ResNet50", "UNI", "CONCH", "BiomedCLIP"]
    scores = pd.DataFrame(rng.normal(size=(8, 5)) + np.arange(5) * 0.8, columns=names)
    result = sig.friedman_nemenyi(scores)
    chi2, p = stats.friedmanchisquare(*(scores[c] for c in names))
    assert result.statistic == pytest.approx(chi2) and result.pvalue == pytest.approx(p)
    expected = sp.posthoc_nemenyi_friedman(scores.to_numpy()).to_numpy()
    np.testing.assert_allclose(result.nemenyi.to_numpy(), expected)
    hand = np.mean([stats.rankdata(-row) for row in scores.to_numpy()], axis=0)
    np.testing.assert_allclose(result.avg_ranks[names].to_numpy(), hand)
    # Demšar (2006), Table 5: q_0.05 = 2.728 for k = 5 -> CD = q sqrt(k (k + 1) / (6 N))
    assert result.critical_difference == pytest.approx(2.728 * np.sqrt(30 / 48), abs=1e-3)
    with pytest.raises(DataError, match=">= 3 extractors"):
        sig.friedman_nemenyi(scores[names[:2]])


def test_jobs_with_different_queries_are_not_paired() -> None:
    values = {"map@5": np.ones(4)}
    a = sig.QueryResults("a", values, ("sha", "test", 4), np.array([0, 1, 0, 1]))
    b = sig.QueryResults("b", values, ("sha", "test", 4), np.array([1, 0, 0, 1]))
    c = sig.QueryResults("c", values, ("other", "test", 4), np.array([0, 1, 0, 1]))
    sig.check_pairable({"A": a, "A again": a})
    for other in (b, c):
        with pytest.raises(DataError, match="did not answer the same queries"):
            sig.check_pairable({"A": a, "B": other})


# -- in the report -----------------------------------------------------------------------------
def _run(model: str, flag: str, root: Path, store: Path, job: Path, *extra: str) -> None:
    from cbmir.pipeline import run_retrieval

    run_retrieval(
        compose_config(
            [
                f"model={model}",
                f"data={flag}",
                "model.pretrained=false",
                "data.synthetic=true",
                "data.download=false",
                f"paths.synthetic_root={root}",
                f"paths.store={store}",
                f"paths.output_dir={job}",
                "gallery.n_queries=0",
                *extra,
            ]
        )
    )


def _copy(sweep: Path, to: Path) -> Path:
    shutil.copytree(sweep, to, ignore=shutil.ignore_patterns("report"))
    return to


def test_cd_diagram_of_synthetic_ranks(tmp_path) -> None:
    """Five extractors whose scores grow by a known step over eight datasets: the best two
    are joined by a bar, the best and the worst are not."""
    from cbmir.figures.cd_diagram import cd_figure, cliques
    from cbmir.report.figures import save_png

    rng = np.random.default_rng(0)
    names = ["VGG19", "ResNet50", "UNI", "CONCH", "pixels"]
    scores = pd.DataFrame(rng.normal(size=(8, 5)) + np.arange(5) * 0.8, columns=names)
    result = sig.friedman_nemenyi(scores)
    groups = cliques(result.avg_ranks, result.nemenyi, 0.05)
    assert any({"pixels", "CONCH"} <= set(g) for g in groups)
    assert not any({"pixels", "VGG19"} <= set(g) for g in groups)
    path = save_png(cd_figure(result.avg_ranks, result.nemenyi, 2.0, "test"), tmp_path / "cd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_marks_the_best_extractor_and_every_one_not_worse(made_sweep, tmp_path) -> None:
    """The report fixture's sweep: two extractors on BreastMNIST at 28 px are paired; one
    dataset is too few for a CD diagram, and the report says so."""
    out = tmp_path / "report"
    report = build_report(_copy(made_sweep, tmp_path / "sweep"), out)
    pairs = pd.read_csv(out / "significance.csv")
    assert set(pairs["metric"]) == {"map@5", "mmv@5", "acc@1", "acc@3", "acc@5"}
    assert (pairs["size"] == 28).all() and len(pairs) == 5  # one pair per metric
    assert ((pairs["p_holm"] >= pairs["p"]) & (pairs["p"] > 0)).all()
    table = (out / "tables" / "significance_28.md").read_text()
    for _, row in pairs.iterrows():
        winner = row["a"] if row["diff"] > 0 else row["b"]
        assert f"| {winner} |" in table or f"| BreastMNIST | {winner} |" in table
    assert table.count("**") >= 2 * 5  # a bold best per metric
    assert "which extractor is best?" in report.markdown
    assert "No critical-difference diagram" in report.markdown
    assert not list((out / "figures").glob("cd_*.png"))


@pytest.fixture(scope="module")
def cd_sweep(made_sweep, make_synthetic, tmp_path_factory) -> Path:
    """The report fixture's sweep plus three extractors x two datasets at 28 px (the new jobs
    with every metric), enough for a Friedman test and a CD diagram."""
    base = tmp_path_factory.mktemp("cd-sweep")
    sweep = _copy(made_sweep, base / "sweep")
    root = make_synthetic("retinamnist", 28).parent
    make_synthetic("breastmnist", 28)
    for model, flag in (
        ("resnet18", "breastmnist"),
        ("pixels", "retinamnist"),
        ("resnet50", "retinamnist"),
        ("resnet18", "retinamnist"),
    ):
        job = sweep / f"{model}-{flag}-28"
        _run(model, flag, root, base / "store", job, "retrieval.metrics=all")
    return sweep


@pytest.mark.slow
def test_report_of_a_real_sweep_draws_cd_diagrams(cd_sweep, tmp_path) -> None:
    out = tmp_path / "report"
    report = build_report(cd_sweep, out)
    assert report.significance is not None
    pairs = pd.read_csv(out / "significance.csv")
    at28 = pairs[(pairs["size"] == 28) & (pairs["dataset"] == "breastmnist")]
    assert len(at28[at28["metric"] == "acc@1"]) == 3  # three extractors: three pairs
    friedman = pd.read_csv(out / "friedman.csv")
    assert set(friedman["n_extractors"]) == {3} and set(friedman["n_datasets"]) == {2}
    cd = out / "figures" / "cd_acc1_28.png"
    assert cd.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and cd in report.figures
    assert "P@5" in (out / "tables" / "size_28_more.md").read_text()  # the further metrics
    shutil.copy(cd, "/tmp/stats_cd_preview.png")  # to look at by hand


def test_compare_two_sweeps_job_by_job_and_refuse_different_queries(
    made_sweep, tmp_path, capsys
) -> None:
    a = _copy(made_sweep, tmp_path / "a")
    out = tmp_path / "cmp"
    assert report_main([str(a), str(made_sweep), "--compare", "--out", str(out)]) == 0
    table = pd.read_csv(out / "compare.csv")
    assert len(table[table["metric"] == "acc@1"]) == 3  # the three jobs both sweeps hold
    assert (table["diff"] == 0).all() and (table["p"] == 1).all()  # identical jobs: no difference
    # sweep B: the same job on another draw of the data -> other queries, refused
    from cbmir.data.synthetic import write_synthetic_medmnist

    other_root = tmp_path / "other-data"
    write_synthetic_medmnist(other_root, "breastmnist", 28, seed=7)
    other = tmp_path / "other-sweep"
    _run("pixels", "breastmnist", other_root, tmp_path / "store", other / "pixels-28")
    capsys.readouterr()
    assert report_main([str(made_sweep), str(other), "--compare", "--out", str(out)]) == 2
    assert "did not answer the same queries" in capsys.readouterr().err
