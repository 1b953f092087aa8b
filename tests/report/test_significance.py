"""Paired tests, Holm, Friedman/Nemenyi and their place in `cbmir-report` (docs/statistics.md).

The report-level tests on the shared `made_sweep` live in test_report_build.py (same file, so
the same pytest-xdist worker builds that sweep once); the CD diagram of a real sweep is slow.
"""

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
    assert best == ["A"] and tied == []  # both others are significantly worse
    _, tied = sig.top_group({"B": means["B"], "C": means["C"]}, pairs)
    assert tied == [min(("B", "C"), key=lambda n: means[n])]  # same distribution: not worse
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
def run_job(model: str, flag: str, root: Path, store: Path, job: Path, *extra: str) -> None:
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


def copy_sweep(sweep: Path, to: Path) -> Path:
    shutil.copytree(sweep, to, ignore=shutil.ignore_patterns("report"))
    return to


def test_cd_diagram_of_synthetic_ranks(tmp_path) -> None:
    """Five extractors whose scores grow by a known step over eight datasets: the best two
    are joined by a bar, the best and the worst are not."""
    from cbmir.figures.cd_diagram import cd_figure, cliques
    from cbmir.figures.png import save_png

    rng = np.random.default_rng(0)
    names = ["VGG19", "ResNet50", "UNI", "CONCH", "pixels"]
    scores = pd.DataFrame(rng.normal(size=(8, 5)) + np.arange(5) * 0.8, columns=names)
    result = sig.friedman_nemenyi(scores)
    groups = cliques(result.avg_ranks, result.nemenyi, 0.05)
    assert any({"pixels", "CONCH"} <= set(g) for g in groups)
    assert not any({"pixels", "VGG19"} <= set(g) for g in groups)
    path = save_png(cd_figure(result.avg_ranks, result.nemenyi, 2.0, "test"), tmp_path / "cd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cd_sweep(made_sweep, make_synthetic, tmp_path_factory) -> Path:
    """The report fixture's sweep plus three extractors x two datasets at 28 px (the new jobs
    with every metric), enough for a Friedman test and a CD diagram."""
    base = tmp_path_factory.mktemp("cd-sweep")
    sweep = copy_sweep(made_sweep, base / "sweep")
    root = make_synthetic("retinamnist", 28).parent
    make_synthetic("breastmnist", 28)
    for model, flag in (
        ("resnet18", "breastmnist"),
        ("pixels", "retinamnist"),
        ("resnet50", "retinamnist"),
        ("resnet18", "retinamnist"),
    ):
        job = sweep / f"{model}-{flag}-28"
        run_job(model, flag, root, base / "store", job, "retrieval.metrics=all")
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


def test_further_metrics_get_their_own_table_only_where_measured() -> None:
    from cbmir.report.tables import extra_table

    nan = float("nan")
    df = pd.DataFrame(
        {
            "size": [28, 28, 64],
            "dataset_paper": ["BreastMNIST"] * 3,
            "model_paper": ["A", "B", "A"],
            "setting": ["", "", ""],
            "map_at_5": [80.0, 70.0, 75.0],
            "precision_at_5": [50.0, nan, nan],
            "precision_at_5_low": [40.0, nan, nan],
            "precision_at_5_high": [60.0, nan, nan],
            "map_at_r": [30.0, 20.0, nan],
            "mrr": [nan, nan, nan],
        }
    )
    table = extra_table(df, 28)
    assert table.splitlines()[0] == "| Dataset | Extractor | P@5 | MAP@R |"
    assert "| BreastMNIST | A | 50.00 [40.0, 60.0] | 30.00 |" in table
    assert "|  | B | — | 20.00 |" in table
    assert extra_table(df, 64) == ""  # nothing beyond the paper's metrics at 64 px
