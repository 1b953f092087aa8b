"""3D through the real `cbmir` entry point: a Hydra multirun over volume settings on a synthetic
AdrenalMNIST3D file, and the error for a 3D set at a 2D-only size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cbmir.data import catalog
from tests.helpers import run_cbmir_in as run_cbmir


def _jobs(logs: Path) -> dict[str, dict]:
    """metrics.json of every finished job, by its volume.reduce setting."""
    jobs = {}
    for metrics in logs.rglob("metrics.json"):
        config = (metrics.parent / "config_resolved.yaml").read_text()
        reduce = next(
            line.split(":")[1].strip() for line in config.splitlines() if "reduce:" in line
        )
        jobs[reduce] = json.loads(metrics.read_text())
    return jobs


def _entry(metrics: dict, which: str) -> dict:
    entry = Path(metrics[f"{which}_entry"])
    return {
        "manifest": json.loads((entry / "manifest.json").read_text()),
        "embeddings": np.load(entry / "embeddings.npy", mmap_mode="r"),
    }


def test_3d_sweep_over_volume_settings(dirs, make_synthetic) -> None:
    # a synthetic AdrenalMNIST3D in the real layout (INFO split sizes) where experiment=offline
    # looks for it; the job uses it as it is
    npz = Path(shutil.copy(make_synthetic("adrenalmnist3d", 28), dirs["synthetic"]))
    run_cbmir(
        [
            "-m",
            "experiment=offline",
            "data=adrenalmnist3d",
            "model=pixels",
            "model.volume.reduce=concat,mean",
            "gallery.n_queries=2",
        ],
        dirs,
    )
    n = catalog.n_samples("adrenalmnist3d")
    jobs = _jobs(dirs["logs"])
    assert sorted(jobs) == ["concat", "mean"]
    for metrics in jobs.values():
        assert (metrics["n_queries"], metrics["n_database"]) == (n["test"], n["train"])
        assert 0.0 <= metrics["map@5"] <= 1.0 and metrics["acc@1"] <= metrics["acc@5"]
    concat, mean = _entry(jobs["concat"], "query"), _entry(jobs["mean"], "query")
    assert mean["manifest"]["shape"] == [n["test"], 28 * 28]
    assert concat["manifest"]["shape"] == [n["test"], 28 * 28 * 28]
    assert concat["manifest"]["volume"] == {
        "reduce": "concat",
        "axes": [0],
        "protocol": "2d-slices",
    }
    assert len(list(dirs["store"].iterdir())) == 4  # volume settings are part of the key
    assert len(list(dirs["logs"].rglob("gallery.png"))) == 2
    # concat of pixel slices in order = the volume itself, row for row, as the job wrote it
    test_images = np.load(npz)["test_images"]
    rows = [0, n["test"] - 1]
    expected = test_images[rows].reshape(2, -1) / np.float32(255)
    np.testing.assert_array_equal(concat["embeddings"][rows], expected)


def test_3d_set_at_128_is_a_clear_error(dirs) -> None:
    proc = run_cbmir(
        ["experiment=offline", "data=adrenalmnist3d", "data.size=128", "model=pixels"],
        dirs,
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "adrenalmnist3d is a 3D dataset: sizes 28 or 64, not 128" in text
    assert "Valid data.size values: 28, 64." in text
    assert "Traceback" not in text
    assert not list(dirs["store"].iterdir()) and not list(dirs["synthetic"].iterdir())


@pytest.mark.slow
def test_3d_sweep_with_pixels_and_a_cnn(dirs) -> None:
    """The brief's sweep as a user types it: pixels and ResNet18 (random weights), mean pooling."""
    run_cbmir(
        [
            "-m",
            "experiment=offline",
            "data=adrenalmnist3d",
            "model=pixels,resnet18",
            "model.volume.reduce=mean",
        ],
        dirs,
    )
    metrics = [json.loads(p.read_text()) for p in dirs["logs"].rglob("metrics.json")]
    dims = sorted(_entry(m, "database")["manifest"]["shape"][1] for m in metrics)
    assert dims == [512, 28 * 28]
