"""The report from a sweep directory: intervals from metrics.json or per_query.npz agree,
unfinished jobs are listed, and the W&B summary run (offline) holds the jobs' table."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest

from cbmir.figures.report_plots import dataset_figure
from cbmir.report.build import build_report
from cbmir.report.cli import main as report_main
from cbmir.report.collect import collect
from cbmir.resume import sha256_file
from tests.report.test_significance import copy_sweep, run_job


@pytest.fixture
def sweep(made_sweep, tmp_path):
    """A private copy of the made sweep, free to modify."""
    return shutil.copytree(made_sweep, tmp_path / "sweep")


def test_intervals_recomputed_from_per_query_match_the_stored_ones(sweep) -> None:
    stored = collect(sweep).set_index("job")
    metrics_path = sweep / "pixels-breastmnist-28" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    del metrics["ci95"]  # a job from before intervals were stored
    metrics_path.write_text(json.dumps(metrics))
    # ... committed as such: its record names the digest of this metrics.json
    record_path = metrics_path.parent / "job.json"
    record = json.loads(record_path.read_text())
    record["files"]["metrics.json"] = sha256_file(metrics_path)
    record_path.write_text(json.dumps(record))
    recomputed = collect(sweep).set_index("job")
    for col in ("map_at_5", "mmv_at_5", "acc_at_1", "acc_at_3", "acc_at_5"):
        for bound in ("_low", "_high"):
            assert recomputed.loc["pixels-breastmnist-28", col + bound] == pytest.approx(
                stored.loc["pixels-breastmnist-28", col + bound]
            )


def test_incomplete_and_failed_jobs_are_listed_not_dropped(sweep) -> None:
    killed = sweep / "pixels-breastmnist-128"
    killed.mkdir()
    shutil.copy(sweep / "pixels-breastmnist-28" / "config_resolved.yaml", killed)
    failed = sweep / "pixels-breastmnist-64"
    (failed / "error.json").write_text(json.dumps({"error": "disk full", "type": "OSError"}))
    report = build_report(sweep)
    status = report.jobs.set_index("job")["status"]
    assert status.to_dict() == {
        "pixels-breastmnist-28": "finished",
        "pixels-breastmnist-64": "failed",
        "pixels-breastmnist-128": "incomplete",
        "resnet50-breastmnist-28": "finished",
    }
    problems = (sweep / "report" / "tables" / "problems.md").read_text()
    assert "OSError: disk full" in problems and "pixels-breastmnist-128" in problems
    assert list(report.size_tables) == [28]


def test_report_writes_nothing_half_done_and_needs_a_sweep(sweep, tmp_path) -> None:
    from cbmir.report.cli import main

    assert main([str(tmp_path / "nowhere")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    build_report(sweep)
    assert not list((sweep / "report").rglob(".*"))  # no temporary files left behind


def test_reference_sits_beside_the_papers_extractors_only(sweep) -> None:
    report = build_report(sweep, reference=True)
    cmp = report.comparison.set_index(["size", "model"])
    assert cmp.loc[(28, "resnet50"), "paper_acc_at_1"] == 79.48  # Table S.1, BreastMNIST
    measured = report.done.set_index(["size", "model"]).loc[(28, "resnet50"), "acc_at_1"]
    assert cmp.loc[(28, "resnet50"), "diff_acc_at_1"] == pytest.approx(measured - 79.48)
    tables = sweep / "report" / "tables"
    assert "| 79.48 |" in (tables / "comparison_28.md").read_text()
    assert not (tables / "comparison_64.md").exists()  # pixels only: nothing published
    markdown = (sweep / "report" / "report.md").read_text()
    assert "28 px beside the paper" in markdown and "64 px beside the paper" not in markdown


def test_custom_data_without_a_size_gets_its_own_table(sweep, npz_job) -> None:
    shutil.copytree(npz_job, sweep / npz_job.name)
    report = build_report(sweep)
    assert list(report.size_tables) == [28, 64, None]
    table = (sweep / "report" / "tables" / "other_data.md").read_text()
    assert "| digits | pixels |" in table
    assert "## Other data (no MedMNIST size)" in report.markdown
    # its bar chart has its bar (a run without a size is a series of its own, not left out)
    plain = report.done[report.done["setting"] == ""]
    axes = dataset_figure(plain, "digits").axes[0]
    heights = [bar.get_height() for bar in axes.patches]
    assert len(heights) == 1 and 0 < heights[0] <= 100


def test_wandb_summary_run_offline_holds_every_job(sweep, monkeypatch, capsys) -> None:
    from cbmir.report.cli import main
    from tests.wandb_offline import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main([str(sweep), "--reference", "--wandb", "--quiet"]) == 0
    (run_dir,) = (sweep / "report" / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert (run["name"], run["group"], run["exit_code"]) == ("report-sweep", "sweep", 0)
    assert run["summary"]["sweep/jobs/nrows"] == 3
    assert run["summary"]["jobs_finished"] == 3
    (table_file,) = (run_dir / "files" / "media" / "table" / "sweep").glob("jobs_*.table.json")
    table = json.loads(table_file.read_text())
    logged = pd.DataFrame(table["data"], columns=table["columns"]).set_index("job")
    measured = pd.read_csv(sweep / "report" / "results.csv").set_index("job")
    assert logged["acc_at_1"].to_dict() == pytest.approx(measured["acc_at_1"].to_dict())
    images = list((run_dir / "files" / "media" / "images" / "figures").glob("*.png"))
    assert {p.name.split("_0_")[0] for p in images} == {"acc1_breastmnist", "acc1_overview"}
    assert run["summary"]["sweep/significance/nrows"] == 5  # pixels vs ResNet50, five metrics
    assert "W&B summary run" in capsys.readouterr().out


def test_sweep_callback_logs_to_wandb_only_when_the_jobs_did_and_never_raises(
    tmp_path, caplog
) -> None:
    from omegaconf import OmegaConf

    from cbmir.report.callback import SweepReport, uses_wandb
    from tests.helpers import compose_config

    assert not uses_wandb(compose_config(["experiment=smoke"]))
    assert uses_wandb(compose_config(["experiment=smoke", "logger=many"]))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "missing")}}})
    SweepReport().on_multirun_end(config)  # no jobs there: a warning, not a failed sweep
    assert "sweep report failed" in caplog.text


def test_of_two_finished_copies_of_a_job_the_tables_keep_the_latest_commit(sweep) -> None:
    from cbmir.report.collect import finished

    original = sweep / "pixels-breastmnist-28"
    rerun = shutil.copytree(original, sweep / "pixels-breastmnist-28-rerun")
    metrics = json.loads((rerun / "metrics.json").read_text())
    (rerun / "metrics.json").write_text(json.dumps({**metrics, "acc@1": 0.0}))
    record = json.loads((rerun / "job.json").read_text())
    record["files"]["metrics.json"] = sha256_file(rerun / "metrics.json")
    (rerun / "job.json").write_text(json.dumps(record))

    def kept_acc1() -> float:
        rows = finished(collect(sweep))
        return rows[rows["job"].str.startswith("pixels-breastmnist-28")]["acc_at_1"].item()

    stamp = (original / "job.json").stat().st_mtime
    os.utime(rerun / "job.json", (stamp - 60, stamp - 60))  # committed before the original
    assert kept_acc1() == pytest.approx(100 * metrics["acc@1"])
    os.utime(rerun / "job.json", (stamp + 60, stamp + 60))  # committed after it
    assert kept_acc1() == 0.0


# -- significance (docs/statistics.md; the statistics: test_significance.py) ---------------
def test_report_marks_the_best_extractor_and_every_one_not_worse(made_sweep, tmp_path) -> None:
    """The report fixture's sweep: two extractors on BreastMNIST at 28 px are paired; one
    dataset is too few for a CD diagram, and the report says so."""
    out = tmp_path / "report"
    report = build_report(copy_sweep(made_sweep, tmp_path / "sweep"), out)
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


def test_compare_two_sweeps_job_by_job_and_refuse_different_queries(
    made_sweep, tmp_path, capsys
) -> None:
    a = copy_sweep(made_sweep, tmp_path / "a")
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
    run_job("pixels", "breastmnist", other_root, tmp_path / "store", other / "pixels-28")
    capsys.readouterr()
    assert report_main([str(made_sweep), str(other), "--compare", "--out", str(out)]) == 2
    assert "did not answer the same queries" in capsys.readouterr().err
