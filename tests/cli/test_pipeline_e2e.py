"""End to end: the real `cbmir` entry point on synthetic MedMNIST files, random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import run_cbmir_in as run_cbmir


def _job_dirs(logs: Path) -> list[Path]:
    return sorted(p.parent for p in logs.rglob("metrics.json"))


def test_offline_main_job_writes_metrics_neighbors_and_config(dirs) -> None:
    run_cbmir(["experiment=offline", "model=resnet50", "data.batch_size=64"], dirs)
    (job,) = _job_dirs(dirs["logs"])
    metrics = json.loads((job / "metrics.json").read_text())
    for key in ("map@5", "mmv@5", "acc@1", "acc@3", "acc@5"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["acc@1"] <= metrics["acc@3"] <= metrics["acc@5"]
    assert (metrics["n_queries"], metrics["n_database"]) == (156, 546)  # BreastMNIST INFO
    assert metrics["embed_seconds"] > 0 and metrics["search_seconds"] > 0
    neighbors = np.load(job / "neighbors.npz")
    assert neighbors["indices"].shape == (156, 5)
    assert neighbors["indices"].max() < 546
    assert np.all(np.diff(neighbors["distances"], axis=1) >= 0)
    assert (job / "config_resolved.yaml").is_file()
    assert (job / "csv" / "metrics.csv").is_file()
    assert sorted(metrics["embedded_now"]) == ["test", "train"]


def test_second_run_with_another_distance_reuses_the_store(dirs) -> None:
    run_cbmir(["experiment=offline", "model=pixels"], dirs)
    entries = sorted(p.name for p in dirs["store"].iterdir())
    run_cbmir(["experiment=offline", "model=pixels", "retrieval=cosine"], dirs)
    assert sorted(p.name for p in dirs["store"].iterdir()) == entries
    results = [json.loads((j / "metrics.json").read_text()) for j in _job_dirs(dirs["logs"])]
    by_distance = {r["distance"]: r for r in results}
    assert by_distance["cosine"]["embedded_now"] == []
    assert sorted(by_distance["euclidean"]["embedded_now"]) == ["test", "train"]


@pytest.mark.slow  # three subprocess runs; tests/extractors/test_random_init.py::
# test_the_seed_picks_the_weights_and_the_store_key pins the rule in-process
def test_random_weights_of_another_seed_embed_anew_under_their_own_keys(dirs) -> None:
    """seed=0 then seed=1 on one store: the second run must not reuse seed 0's random weights'
    embeddings (it once reported them as `cached`); seed=0 again finds its own."""
    args = ["experiment=offline", "model=resnet18", "data.batch_size=256", "gallery.n_queries=0"]
    results = {}
    for run, seed in (("first", 0), ("other", 1), ("again", 0)):
        out = dirs["logs"] / run
        run_cbmir([*args, f"seed={seed}", f"hydra.run.dir={out}"], dirs)
        results[run] = json.loads((out / "metrics.json").read_text())
    assert sorted(results["first"]["embedded_now"]) == ["test", "train"]
    assert sorted(results["other"]["embedded_now"]) == ["test", "train"]
    assert results["again"]["embedded_now"] == []
    assert results["again"]["map@5"] == results["first"]["map@5"]
    manifests = [json.loads((p / "manifest.json").read_text()) for p in dirs["store"].iterdir()]
    assert len(manifests) == 4
    seeds = sorted((m["extractor"]["seed"], m["extractor"]["init"]) for m in manifests)
    assert [s for s, _ in seeds] == [0, 0, 1, 1]


@pytest.mark.slow  # bf16 on a CPU is slow; tests/test_embedding.py pins both rules in-process
def test_channels_last_reuses_the_store_but_bf16_embeds_anew(dirs) -> None:
    run_cbmir(["experiment=offline", "model=resnet18"], dirs)
    entries = sorted(p.name for p in dirs["store"].iterdir())
    run_cbmir(["experiment=offline", "model=resnet18", "channels_last=false"], dirs)  # auto: on
    assert sorted(p.name for p in dirs["store"].iterdir()) == entries  # speed only: cached
    run_cbmir(["experiment=offline", "model=resnet18", "trainer.precision=bf16-mixed"], dirs)
    new = sorted(set(p.name for p in dirs["store"].iterdir()) - set(entries))
    assert len(new) == 2  # bf16 numbers never pass for float32 ones: test and train again
    manifests = [json.loads((dirs["store"] / n / "manifest.json").read_text()) for n in new]
    assert {m["precision"] for m in manifests} == {"bf16-mixed"}


def test_multirun_sweeps_every_combination_and_survives_a_failing_job(dirs) -> None:
    proc = run_cbmir(
        [
            "-m",
            "experiment=offline",
            "model=pixels,resnet18",
            "data=breastmnist,retinamnist",
            "data.size=28",
        ],
        dirs,
    )
    assert len(_job_dirs(dirs["logs"])) == 4
    # one job's file is missing (downloads off): it fails alone, the other finishes
    before = set(_job_dirs(dirs["logs"]))
    proc = run_cbmir(
        [
            "-m",
            "model=pixels",
            "data=breastmnist,dermamnist",
            "data.download=false",
            # the synthetic breastmnist fails the published MD5 unless told otherwise
            "data.verify=false",
            f"data.root={dirs['synthetic']}",
        ],
        dirs,
        check=False,
    )
    assert proc.returncode == 1
    assert "dermamnist.npz" in proc.stderr + proc.stdout
    (new_job,) = set(_job_dirs(dirs["logs"])) - before
    assert "breastmnist" in (new_job / "config_resolved.yaml").read_text()
    (failed,) = [p.parent for p in dirs["logs"].rglob("error.json")]
    assert "dermamnist.npz" in (failed / "error.json").read_text()


def test_wandb_offline_one_finished_run_per_job_grouped_per_sweep(dirs) -> None:
    from tests.wandb_offline import read_offline_run

    run_cbmir(
        ["-m", "experiment=offline", "logger=wandb", "model=pixels", "retrieval=paper,cosine"],
        dirs,
    )
    runs = [read_offline_run(p) for p in sorted(dirs["logs"].rglob("offline-run-*"))]
    assert len(runs) == 2
    assert {r["name"] for r in runs} == {"pixels-breastmnist-28"}
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"]
    assert all(r["exit_code"] == 0 for r in runs)  # every run finished at the end of its job
    measured = sorted(
        json.loads((job / "metrics.json").read_text())["map@5"] for job in _job_dirs(dirs["logs"])
    )
    assert sorted(r["summary"]["map@5"] for r in runs) == pytest.approx(measured)
    assert {r["config"]["retrieval"]["distance"] for r in runs} == {"euclidean", "cosine"}
