"""The real `cbmir -m experiment=smoke` sweep (subprocesses): it runs, resumes, re-runs only
what is missing, lists failures, and ends with its report written by the Hydra callback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import run_cbmir

# an 8-job sweep of two real extractors (~2 min on 2 cores): the default suite covers multirun,
# resume, job directories and the report in tests/cli, tests/sweeps/test_shared_sweep_dir.py and
# tests/report; this is the whole preset end to end
pytestmark = pytest.mark.slow

JOBS = [
    f"{model}-{flag}-{size}"
    for model in ("pixels", "resnet18")
    for flag in ("breastmnist", "retinamnist")
    for size in (28, 64)
]


def _run_name(job_dir: Path) -> str:
    """A job directory is named RUN_NAME-FINGERPRINT (10 hex digits)."""
    name, _, digest = job_dir.name.rpartition("-")
    assert re.fullmatch(r"[0-9a-f]{10}", digest), job_dir.name
    return name


def _job_dir(sweep: Path, run_name: str) -> Path:
    (found,) = [p for p in sweep.iterdir() if p.is_dir() and p.name.startswith(run_name + "-")
                and _run_name(p) == run_name]  # fmt: skip
    return found


def _mtimes(sweep: Path) -> dict[str, int]:
    return {_run_name(p.parent): p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """Launch the smoke sweep three times: fresh, again, and after deleting one job's results
    (this third launch also adds two cells with an invalid size, which must fail alone)."""
    root = tmp_path_factory.mktemp("smoke")
    sweep = root / "logs" / "retrieval" / "multiruns" / "smoke"
    first = run_cbmir(["-m", "experiment=smoke"], root)
    after_first = _mtimes(sweep)
    store_entries = sorted(p.name for p in (root / "store").iterdir())
    report_made = (sweep / "report" / "report.md").is_file()
    second = run_cbmir(["-m", "experiment=smoke"], root)
    after_second = _mtimes(sweep)
    (_job_dir(sweep, "resnet18-retinamnist-28") / "metrics.json").unlink()
    cells = "cell=breastmnist@28,breastmnist@64,retinamnist@28,retinamnist@64,breastmnist@100"
    third = run_cbmir(["-m", "experiment=smoke", cells], root, check=False)
    return {
        "root": root,
        "sweep": sweep,
        "logs": [first, second, third],
        "mtimes": [after_first, after_second, _mtimes(sweep)],
        "store_entries": store_entries,
        "report_made": report_made,
    }


def test_smoke_sweep_runs_every_job_into_a_named_directory(smoke) -> None:
    sweep = smoke["sweep"]
    assert sorted(smoke["mtimes"][0]) == sorted(JOBS)
    for job in JOBS:
        metrics = json.loads((_job_dir(sweep, job) / "metrics.json").read_text())
        assert metrics["n_queries"] == (156 if "breast" in job else 400)
        for key in ("map@5", "mmv@5", "acc@1", "acc@3", "acc@5"):
            low, high = metrics["ci95"][key]
            assert low <= metrics[key] <= high
    assert smoke["report_made"]  # the SweepReport callback ran at the end of the multirun


def test_relaunch_runs_nothing_new(smoke) -> None:
    second = smoke["logs"][1]
    assert second.stdout.count("skipping, results exist") + second.stderr.count(
        "skipping, results exist"
    ) == len(JOBS)
    assert "job finished" not in second.stdout + second.stderr
    assert smoke["mtimes"][1] == smoke["mtimes"][0]


def test_deleted_results_rerun_alone_and_reuse_the_store(smoke) -> None:
    third = smoke["logs"][2]
    text = third.stdout + third.stderr
    assert text.count("skipping, results exist") == len(JOBS) - 1
    before, after = smoke["mtimes"][0], smoke["mtimes"][2]
    changed = {job for job in JOBS if after[job] != before[job]}
    assert changed == {"resnet18-retinamnist-28"}
    job = _job_dir(smoke["sweep"], "resnet18-retinamnist-28")
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["embedded_now"] == []  # embeddings came from the store
    assert sorted(p.name for p in (smoke["root"] / "store").iterdir()) == smoke["store_entries"]


def test_an_invalid_cell_fails_alone_with_a_message(smoke) -> None:
    third = smoke["logs"][2]
    assert third.returncode == 1
    for model in ("pixels", "resnet18"):
        job = _job_dir(smoke["sweep"], f"{model}-breastmnist-100")
        error = json.loads((job / "error.json").read_text())
        assert "28, 64, 128, 224" in error["error"]
    assert "Traceback" not in third.stdout + third.stderr


def test_report_cli_lists_every_job_and_the_failures(smoke, tmp_path, capsys) -> None:
    import pandas as pd
    from matplotlib.image import imread

    from cbmir.report.cli import main

    out = tmp_path / "report"
    assert main([str(smoke["sweep"]), "--out", str(out), "--reference"]) == 0
    printed = capsys.readouterr().out
    assert "8 finished, 2 failed, 0 incomplete" in printed
    jobs = pd.read_csv(out / "results.csv")
    assert len(jobs) == len(JOBS) + 2
    done = jobs[jobs["status"] == "finished"]
    for _, row in done.iterrows():
        metrics = json.loads((smoke["sweep"] / row["job"] / "metrics.json").read_text())
        assert row["acc_at_1"] == pytest.approx(100 * metrics["acc@1"])
        assert row["acc_at_1_low"] <= row["acc_at_1"] <= row["acc_at_1_high"]
        assert row["embed_seconds"] > 0 and row["search_seconds"] > 0
    failed = jobs[jobs["status"] == "failed"]
    assert sorted(failed["run_name"]) == ["pixels-breastmnist-100", "resnet18-breastmnist-100"]
    markdown = (out / "report.md").read_text()
    assert "Failed or incomplete jobs" in markdown and "pixels-breastmnist-100" in markdown
    assert "Not comparable to the paper" in markdown  # synthetic data, random weights
    for size in (28, 64):
        table = (out / "tables" / f"size_{size}.md").read_text()
        row = next(line for line in table.splitlines() if "resnet18" in line)
        assert row.count("[") == 5  # five metrics, each with its interval
        assert table in printed
    assert "embed s" in (out / "tables" / "timings.md").read_text()
    for name in ("acc1_breastmnist", "acc1_retinamnist", "acc1_overview"):
        image = imread(out / "figures" / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0
