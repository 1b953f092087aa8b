"""`cbmir-plot embeddings`: a class-coloured 2D map of a run's stored database embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbmir.figures.cli import main
from cbmir.figures.embedding_map import MULTIPLE, class_names, subsample, umap_available
from cbmir.figures.labels import NO_LABEL
from tests.query.runs import run_benchmark


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return run_benchmark(tmp_path_factory.mktemp("plot"), "breast", "gallery.n_queries=0")


def plot(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_tsne_map_of_the_database_is_written_into_the_run(run: Path, capsys) -> None:
    code, out, _ = plot(capsys, "embeddings", run, "--threads", "1")
    assert code == 0 and "embeddings_tsne.png" in out
    with Image.open(run / "embeddings_tsne.png") as figure:
        assert figure.size == (1275, 975)  # 8.5 x 6.5 in at 150 dpi
    saved = np.load(run / "embeddings_tsne.npz")
    entry = Path(json.loads((run / "metrics.json").read_text())["database_entry"])
    labels = np.load(entry / "labels.npy")
    assert saved["rows"].tolist() == list(range(546))
    assert saved["coords"].shape == (546, 2) and np.isfinite(saved["coords"]).all()
    np.testing.assert_array_equal(saved["labels"], labels)
    # the map keeps the class structure the pixel search found (acc@1 ~0.9 on this data):
    # most points' 5 nearest map neighbours share their class (chance: 0.5)
    coords, y = saved["coords"], labels[:, 0]
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    agreement = (y[np.argsort(d, axis=1)[:, :5]] == y[:, None]).mean()
    assert agreement > 0.7


def test_large_databases_are_subsampled_with_the_seed(run: Path, tmp_path, capsys) -> None:
    out = tmp_path / "map.png"
    code, _, _ = plot(
        capsys,
        "embeddings",
        run,
        "--max-points",
        "120",
        "--seed",
        "4",
        "--out",
        out,
        "--threads",
        "1",
    )
    assert code == 0 and out.is_file()
    rows = np.load(tmp_path / "map.npz")["rows"]
    assert len(rows) == 120 and len(set(rows.tolist())) == 120
    assert rows.tolist() == subsample(546, 120, seed=4).tolist()
    assert rows.tolist() != subsample(546, 120, seed=5).tolist()


def test_multilabel_points_are_named_by_their_labels() -> None:
    names = {0: "a", 1: "b", 2: "c"}
    labels = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 1]])
    assert class_names(labels, names).tolist() == ["b", NO_LABEL, MULTIPLE]


@pytest.mark.skipif(umap_available(), reason="umap-learn is installed here")
def test_umap_without_umap_learn_is_a_clear_error(run: Path, capsys) -> None:
    code, _, err = plot(capsys, "embeddings", run, "--method", "umap")
    assert code == 2 and "pip install umap-learn" in err


def test_a_directory_that_is_no_run_is_refused(tmp_path, capsys) -> None:
    code, _, err = plot(capsys, "embeddings", tmp_path)
    assert code == 2 and "neither a finished cbmir run" in err


def test_cbmir_plot_console_script_points_at_the_figures_cli() -> None:
    from importlib import import_module
    from pathlib import Path

    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    target = tomllib.loads(pyproject.read_text())["project"]["scripts"]["cbmir-plot"]
    module, _, function = target.partition(":")
    assert getattr(import_module(module), function) is main
