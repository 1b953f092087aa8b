"""3D data through the real pipeline, in-process: synthetic MedMNIST-layout 3D files (split sizes
from INFO) and your own N x D x H x W npz (`data=npz`), into the store, search and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbmir.data import catalog
from cbmir.store import EmbeddingStore, StoredEmbeddings
from tests.helpers import compose_config

BASE = ["logger=csv", "trainer.enable_progress_bar=false", "gallery.n_queries=2"]


def run(tmp: Path, name: str, *overrides: str) -> tuple[dict, dict[str, StoredEmbeddings], Path]:
    """One job into tmp/name: its metrics and its query/database store entries."""
    from cbmir.pipeline import run_retrieval

    out = tmp / name
    cfg = compose_config(
        [*BASE, f"paths.store={tmp / 'store'}", f"paths.output_dir={out}", *overrides]
    )
    run_retrieval(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    store = EmbeddingStore(tmp / "store")
    entries = {
        split: store.load(Path(metrics[f"{split}_entry"]).name) for split in ("query", "database")
    }
    return metrics, entries, out


def medmnist_3d(make_synthetic, tmp: Path, flag: str) -> list[str]:
    """Overrides for a synthetic 3D file in the real MedMNIST layout (the shared file is read
    only: its npy conversion goes under tmp)."""
    root = make_synthetic(flag, 28).parent
    return [
        f"data={flag}",
        "data.synthetic=true",
        "data.download=false",
        f"paths.synthetic_root={root}",
        f"+data.cache_dir={tmp / 'npy'}",
    ]


def _write_volumes(path: Path, shape: tuple[int, ...], n_train: int = 40, n_test: int = 12) -> Path:
    """Two classes of volumes: a bright blob in the first or the last slices, plus noise."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 2, size=(n, 1))
        images = rng.integers(0, 80, size=(n, *shape))
        half = shape[0] // 2
        for i, label in enumerate(labels[:, 0]):
            images[i, :half] += 150 if label == 0 else 0
            images[i, half:] += 150 if label == 1 else 0
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_npz_volumes_run_tri_planar_with_a_cnn(tmp_path) -> None:
    npz = _write_volumes(tmp_path / "vols.npz", (6, 10, 12))  # non-cubic N x D x H x W
    metrics, entries, _ = run(
        tmp_path,
        "cnn",
        "data=npz",
        f"data.path={npz}",
        "model=timm",
        "model.model_name=test_resnet",  # timm's tiny test CNN (96-d), random weights
        "model.pretrained=false",
        "model.pool=avg",
        "model.input_size=null",
        "model.min_size=null",
        "model.volume.axes=[0,1,2]",
        "model.volume.slice_batch_size=64",
    )
    assert (metrics["n_queries"], metrics["n_database"]) == (12, 40)
    # 96-d slice features: 6 slices along D, 10 along H, 12 along W, concatenated
    assert entries["database"].embeddings.shape == (40, 96 * (6 + 10 + 12))
    assert entries["query"].manifest["volume"]["axes"] == [0, 1, 2]
    assert metrics["acc@5"] >= metrics["acc@1"] >= 0.0


@pytest.mark.parametrize(("volumes", "dim"), [("true", 8 * 3), ("null", 3 * 8 * 8)])
def test_npz_ambiguous_shape_follows_data_volumes(tmp_path, volumes, dim) -> None:
    # N x 8 x 8 x 3: RGB 8 x 8 images by default, or 8-slice volumes of 8 x 3 with volumes=true
    npz = _write_volumes(tmp_path / "ambiguous.npz", (8, 8, 3))
    _, entries, _ = run(
        tmp_path,
        f"volumes-{volumes}",
        "data=npz",
        f"data.path={npz}",
        f"data.volumes={volumes}",
        "model=pixels",
        "model.volume.reduce=mean",
    )
    assert entries["query"].embeddings.shape == (12, dim)
    assert ("volume" in entries["query"].manifest) == (volumes == "true")


@pytest.mark.slow
@pytest.mark.parametrize("flag", catalog.FLAGS_3D)
def test_every_3d_dataset_runs_at_28(make_synthetic, tmp_path, flag) -> None:
    metrics, entries, _ = run(
        tmp_path, flag, *medmnist_3d(make_synthetic, tmp_path, flag), "model=pixels"
    )
    n = catalog.n_samples(flag)
    assert (metrics["n_queries"], metrics["n_database"]) == (n["test"], n["train"])
    assert entries["database"].embeddings.shape == (n["train"], 28**3)
