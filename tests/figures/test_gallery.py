"""The benchmark's own gallery: a PNG in every run directory and a table in W&B (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbmir.figures.gallery import GALLERY_PNG, pick_queries, write_gallery
from cbmir.figures.grid import GridLayout
from tests.query.runs import run_benchmark


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gallery")


@pytest.fixture(scope="module")
def default_run(root: Path) -> Path:
    """The default job (gallery on), shared by the tests that read its files."""
    return run_benchmark(root, "default")


def test_pick_queries_takes_classes_in_turn_with_the_seed() -> None:
    labels = np.array([[0]] * 90 + [[1]] * 8 + [[2]] * 2)
    rows = pick_queries(labels, 6, seed=3, multilabel=False)
    assert np.bincount(labels[rows, 0], minlength=3).tolist() == [2, 2, 2]
    assert labels[rows, 0].tolist() == sorted(labels[rows, 0].tolist())
    assert rows.tolist() == pick_queries(labels, 6, seed=3, multilabel=False).tolist()
    assert len(set(rows.tolist())) == 6
    assert pick_queries(labels, 1000, seed=0, multilabel=False).tolist() == list(range(100))


def test_pick_queries_samples_multilabel_sets_without_repeats() -> None:
    labels = np.zeros((50, 14), dtype=np.int64)
    rows = pick_queries(labels, 8, seed=0, multilabel=True)
    assert len(set(rows.tolist())) == 8 and rows.tolist() == sorted(rows.tolist())
    assert rows.max() < 50


def test_every_run_writes_a_gallery_of_its_own_neighbours(default_run: Path) -> None:
    run = default_run
    with Image.open(run / GALLERY_PNG) as gallery:
        assert gallery.size == GridLayout().size(8, 1 + 5, title=True)
        pixels = np.asarray(gallery.convert("RGB"))
    # the first query's neighbours: border colours say hit/miss, as neighbors.npz + labels do
    saved = np.load(run / "neighbors.npz")
    entry = Path(json.loads((run / "metrics.json").read_text())["database_entry"])
    db_labels = np.load(entry / "labels.npy")[:, 0]
    first = pick_queries(saved["query_labels"], 8, seed=0, multilabel=False)[0]
    hits = db_labels[saved["indices"][first]] == saved["query_labels"][first, 0]
    layout = GridLayout()
    for col, hit in enumerate(hits, start=1):
        x, y = layout.origin(0, col, title=True)
        expected = (44, 160, 44) if hit else (214, 39, 40)
        assert tuple(pixels[y + 1, x + 1]) == expected


def test_write_gallery_takes_the_datamodule_not_the_config(default_run: Path, tmp_path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    datamodule = instantiate(OmegaConf.load(default_run / "config_resolved.yaml").data)
    datamodule.setup("predict")
    shutil.copy(default_run / "neighbors.npz", tmp_path / "neighbors.npz")
    assert write_gallery(datamodule, tmp_path, 0) is None and not (tmp_path / GALLERY_PNG).exists()
    path = write_gallery(datamodule, tmp_path, 3, seed=1, run_name="r", distance="cosine")
    assert path == tmp_path / GALLERY_PNG
    with Image.open(path) as gallery:
        assert gallery.size == GridLayout().size(3, 1 + 5, title=True)


def test_n_queries_zero_turns_the_gallery_off(root: Path) -> None:
    run = run_benchmark(root, "off", "gallery.n_queries=0", "retrieval=cosine")
    assert (run / "metrics.json").is_file()
    assert not (run / GALLERY_PNG).exists()


def test_wandb_logger_gets_the_gallery_as_a_table(root: Path, monkeypatch) -> None:
    from wandb.proto import wandb_internal_pb2 as pb

    from tests.wandb_offline import _records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(root / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(root / "wandb-cache"))
    run = run_benchmark(
        root, "wandb", "logger=wandb", "logger.wandb.offline=true", "gallery.n_queries=3"
    )
    import wandb

    wandb.teardown()  # in-process: wait for the W&B service to flush the run file
    (wandb_file,) = run.glob("wandb/offline-run-*/*.wandb")
    history, tables = {}, []
    for raw in _records(wandb_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.update(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            )
        elif kind == "artifact" and record.artifact.type == "run_table":
            tables.append(record.artifact)
    assert json.loads(history["gallery/table/nrows"]) == 3
    assert json.loads(history["gallery/table/ncols"]) == 3 + 4 * 5
    assert json.loads(history["gallery/grid/_type"]) == "image-file"
    (artifact,) = tables
    files = {c.path: c.local_path for c in artifact.manifest.contents}
    table = json.loads(Path(files["gallery/table.table.json"]).read_text())
    assert table["columns"][:4] == ["query", "query image", "query label", "#1 image"]
    assert len(table["data"]) == 3
    saved = np.load(run / "neighbors.npz")
    for row in table["data"]:
        query = int(row[0][len("test[") : -1])
        assert row[1]["_type"] == "image-file" and row[1]["path"] in files
        logged = [row[3 + 4 * r + 2] for r in range(5)]
        np.testing.assert_allclose(logged, saved["distances"][query], rtol=1e-6)
