"""Runs the query tests search: a 2D (synthetic BreastMNIST) and a 3D (small npz) pixel run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.query.runs import run_benchmark


@pytest.fixture(scope="session")
def query_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("query")


@pytest.fixture(scope="session")
def breast_run(query_root: Path) -> Path:
    """pixels on synthetic BreastMNIST 28 px: 156 test queries, 546 train database rows."""
    return run_benchmark(query_root, "breast")


@pytest.fixture(scope="session")
def resnet_run(query_root: Path) -> Path:
    """ResNet-18 with random weights (drawn from the run's seed) on the same BreastMNIST."""
    return run_benchmark(
        query_root,
        "resnet18",
        "model=timm",
        "model.model_name=resnet18",
        "model.input_size=null",
        "gallery.n_queries=0",
    )


VOLUME_CLASSES = ["calm", "busy"]


def write_volume_npz(path: Path, side: int = 16, seed: int = 0) -> Path:
    """A small 3D collection in the MedMNIST npz layout (N x D x H x W uint8, labels N x 1):
    two classes, each a smooth prototype plus per-volume noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(0, np.pi, side)] * 3, indexing="ij"))
    prototypes = [np.sin(grid).prod(axis=0), np.cos(2 * grid).sum(axis=0) / 3]
    arrays = {}
    for split, n in (("train", 60), ("val", 10), ("test", 20)):
        labels = np.arange(n) % 2
        noise = rng.normal(scale=0.5, size=(n, side, side, side))
        volumes = np.stack([prototypes[c] for c in labels]) + noise
        arrays[f"{split}_images"] = np.clip(128 + 60 * volumes, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def volume_run(query_root: Path) -> Path:
    """pixels on a small custom 3D npz (`data=npz`, 16^3 volumes): 20 test x 60 train."""
    npz = write_volume_npz(query_root / "vols.npz")
    names = ",".join(VOLUME_CLASSES)
    return run_benchmark(
        query_root,
        "vols",
        "data=npz",
        f"data.path={npz}",
        f"+data.label_names=[{names}]",
        offline=False,
    )
