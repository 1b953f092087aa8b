"""Own collections name their cases: a `data=folder` run of PNG class folders (class names that
are words, not ids) writes `neighbors.csv` with file paths and label names, its gallery and W&B
table caption cases by file, `cbmir-query` prints the neighbours' files, and the embedding map
reads the class names. MedMNIST outputs stay as they were (rows are indices: no paths)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from cbmir.figures.gallery import NEIGHBORS_CSV, wandb_table, write_neighbor_table
from cbmir.figures.labels import names_from_config
from cbmir.figures.neighbours import QueryResult, neighbour_cells
from cbmir.query.cli import main as query_main
from tests.data.collection_files import digits
from tests.query.runs import run_benchmark

CLASSES = ["zero", "one", "two", "three", "four"]


def write_named_tree(root: Path) -> None:
    """root/<split>/<class word>/<i>.png: 30 digits, every third one a test image."""
    images, labels, splits = digits(30)
    for i, (image, label, split) in enumerate(zip(images, labels, splits, strict=True)):
        folder = root / split / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("collection_outputs")
    write_named_tree(root / "tree")
    return run_benchmark(
        root,
        "folder",
        "data=folder",
        f"data.path={root / 'tree'}",
        f"data.cache_dir={root / 'cache'}",
        "gallery.n_queries=3",
        offline=False,
    )


def datamodule_of(run: Path):
    from hydra.utils import instantiate

    dm = instantiate(OmegaConf.load(run / "config_resolved.yaml").data)
    dm.prepare_data()
    dm.setup()
    return dm


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_neighbors_csv_names_every_neighbour_by_file_and_class(folder_run: Path) -> None:
    found = np.load(folder_run / "neighbors.npz")
    rows = read_rows(folder_run / NEIGHBORS_CSV)
    n_queries, k = found["indices"].shape
    assert len(rows) == n_queries * k
    dm = datamodule_of(folder_run)
    test_files, train_files = dm.split_files("test"), dm.split_files("train")
    for row in rows:
        q, rank, neighbour = int(row["query_row"]), int(row["rank"]), int(row["neighbor_row"])
        assert neighbour == found["indices"][q, rank - 1]
        assert float(row["distance"]) == found["distances"][q, rank - 1]
        assert row["query_file"] == test_files[q] and row["neighbor_file"] == train_files[neighbour]
        # the label names are the class folders the files lie in
        assert row["query_label"] == Path(row["query_file"]).parent.name
        assert row["neighbor_label"] == Path(row["neighbor_file"]).parent.name
        assert row["hit"] == str(int(row["query_label"] == row["neighbor_label"]))
        assert Path(row["neighbor_file"]).is_file() and "/train/" in row["neighbor_file"]


def test_gallery_and_wandb_table_caption_cases_by_file(folder_run: Path) -> None:
    dm = datamodule_of(folder_run)
    found = np.load(folder_run / "neighbors.npz")
    files = dm.split_files("train")
    query_file = dm.split_files("test")[0]
    result = QueryResult(
        "test[0]", np.zeros((28, 28), np.uint8), found["indices"][0], found["distances"][0]
    )
    result.label, result.file = found["query_labels"][0], query_file
    names = dm.label_names
    labels = dm.labels("train")

    def fetch(row: int) -> np.ndarray:
        return np.zeros((28, 28), np.uint8)

    (cells,) = neighbour_cells([result], fetch, labels, names, False, files)
    assert cells[0].lines[-1] == Path(query_file).name
    first = int(found["indices"][0, 0])
    assert cells[1].lines[0] == f"#1 · {Path(files[first]).name}"
    assert cells[1].lines[1] == Path(files[first]).parent.name  # the class word, not an id
    (plain,) = neighbour_cells([result], fetch, labels, names, False)  # MedMNIST: rows
    assert plain[1].lines[0] == f"#1 · row {first}"

    table = wandb_table([result], fetch, labels, names, False, files)
    cells_by_column = dict(zip(table.columns, table.data[0], strict=True))
    assert cells_by_column["query file"] == query_file
    assert cells_by_column["#1 file"] == files[first]
    assert "query file" not in wandb_table([result], fetch, labels, names, False).columns
    assert (folder_run / "gallery.png").is_file()


def test_cbmir_query_prints_the_neighbours_files(folder_run, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        query_main(["--run", str(folder_run), "--index=0", "--out", str(tmp_path / "q.png")])
    stdout = capsys.readouterr().out
    assert stop.value.code == 0, stdout
    dm = datamodule_of(folder_run)
    first = read_rows(folder_run / NEIGHBORS_CSV)[0]  # query row 0, rank 1: the same search
    assert f"#1 file: {first['neighbor_file']}\n" in stdout
    assert f"query file: {dm.split_files('test')[0]}\n" in stdout
    assert f" {Path(first['neighbor_file']).name} " in stdout  # in the table too


def test_embedding_map_names_come_from_the_collection(folder_run: Path, tmp_path) -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(folder_run / "config_resolved.yaml").data)
    entry = Path(json.loads((folder_run / "metrics.json").read_text())["database_entry"])
    sha = json.loads((entry / "manifest.json").read_text())["data"]["source_sha256"]
    labels = np.load(entry / "labels.npy")
    assert names_from_config(cfg, labels, sha) == dict(enumerate(sorted(CLASSES)))  # folder order
    ids = {i: str(i) for i in range(len(CLASSES))}
    assert names_from_config(cfg, labels, "0" * 64) == ids  # another decode: ids, never its names
    moved = {**cfg, "path": str(tmp_path / "gone")}
    assert names_from_config(moved, labels, sha) == ids  # files gone: ids


def test_medmnist_rows_have_no_files(tmp_path) -> None:
    from cbmir.data import NpzDataModule
    from tests.data.collection_files import write_npz

    images, labels, splits = digits(15)
    dm = NpzDataModule(write_npz(tmp_path / "d.npz", images, labels, splits), cache_dir=tmp_path)
    dm.setup()
    assert dm.split_files("test") is None
    assert write_neighbor_table(dm, tmp_path) is None and not (tmp_path / NEIGHBORS_CSV).exists()
