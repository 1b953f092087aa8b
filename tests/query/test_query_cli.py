"""`cbmir-query` against databases built by the real pipeline: the printed neighbours must be
the run's own (`neighbors.npz`), whichever way the query arrives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbmir.data import catalog
from cbmir.figures.grid import GridLayout
from cbmir.query.cli import main
from tests.query.conftest import VOLUME_CLASSES
from tests.query.runs import dir_overrides

ROW = re.compile(r"^\s*[│|]\s*(\d+)\s*[│|]\s*(\d+)\s*[│|]\s*(.+?)\s*[│|]\s*([-+.\deE]+)\s*[│|]")


def run_query(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def printed_neighbours(stdout: str) -> dict[str, list[tuple[int, str, float]]]:
    """{query name: [(database row, label, distance), ...]} read back from the rich tables."""
    tables: dict[str, list[tuple[int, str, float]]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("query "):
            current = line.split(" · ")[0][len("query ") :].strip()
            tables[current] = []
        elif (match := ROW.match(line)) and current is not None:
            rank, row, label, dist = match.groups()
            assert int(rank) == len(tables[current]) + 1
            tables[current].append((int(row), label, float(dist)))
    return tables


def expected_size(layout: GridLayout, n_rows: int, n_cols: int) -> tuple[int, int]:
    """Grid size from the layout's fields: pad, then per cell border+tile+border(+captions)+pad."""
    cell_w = layout.tile + 2 * layout.border
    cell_h = cell_w + layout.caption_lines * layout.line_height
    width = layout.pad + n_cols * (cell_w + layout.pad)
    height = layout.title_height + layout.pad + n_rows * (cell_h + layout.pad)
    return width, height


def test_index_queries_print_the_runs_neighbours_and_draw_the_grid(breast_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rows = [0, 5, 155]
    code, stdout, _ = run_query(
        capsys, "--run", breast_run, *[f"--index={i}" for i in rows], "--out", out
    )
    assert code == 0
    saved = np.load(breast_run / "neighbors.npz")
    names = catalog.label_names("breastmnist")
    db_labels = np.load(
        Path(json.loads((breast_run / "metrics.json").read_text())["database_entry"]) / "labels.npy"
    )
    tables = printed_neighbours(stdout)
    assert list(tables) == [f"test[{i}]" for i in rows]
    for i in rows:
        printed = tables[f"test[{i}]"]
        assert [r for r, _, _ in printed] == saved["indices"][i].tolist()
        np.testing.assert_allclose([d for _, _, d in printed], saved["distances"][i], rtol=1e-5)
        assert [lab for _, lab, _ in printed] == [
            names[int(db_labels[r, 0])] for r, _, _ in printed
        ]
    with Image.open(out) as grid:
        assert grid.size == expected_size(GridLayout(), len(rows), 1 + 5)


def test_picture_and_array_queries_find_the_runs_neighbours(breast_run, tmp_path, capsys):
    """The stored test image 5 as a grey PNG, an RGB PNG (grey repeated) and a float .npy."""
    images = np.load(breast_run.parent.parent / "synthetic" / "breastmnist_npy" / "test_images.npy")
    image = images[5]
    Image.fromarray(image).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([image] * 3, axis=-1)).save(tmp_path / "rgb.png")
    np.save(tmp_path / "chw.npy", image[None].astype(np.float32) / 255.0)
    code, stdout, stderr = run_query(
        capsys,
        "--run",
        breast_run,
        tmp_path / "grey.png",
        tmp_path / "rgb.png",
        tmp_path / "chw.npy",
        "--out",
        tmp_path / "files.png",
    )
    assert code == 0
    expected = np.load(breast_run / "neighbors.npz")["indices"][5].tolist()
    tables = printed_neighbours(stdout)
    assert set(tables) == {"grey.png", "rgb.png", "chw.npy"}
    for name, printed in tables.items():
        assert [r for r, _, _ in printed] == expected, name
    assert "rgb.png: RGB picture converted to grayscale" in stderr
    assert "grey.png" not in stderr  # nothing to adapt, nothing to say
    with Image.open(tmp_path / "files.png") as grid:
        assert grid.size == expected_size(GridLayout(), 3, 6)


def test_the_store_entry_is_found_by_key_from_config_overrides(breast_run, capsys, tmp_path):
    root = breast_run.parent.parent
    code, stdout, _ = run_query(
        capsys,
        "--index=7",
        "experiment=offline",
        "model=pixels",
        *dir_overrides(root),
        "--out",
        tmp_path / "by_key.png",
    )
    assert code == 0
    assert [r for r, _, _ in printed_neighbours(stdout)["test[7]"]] == (
        np.load(breast_run / "neighbors.npz")["indices"][7].tolist()
    )


def test_a_wrong_size_is_resized_with_a_warning_and_refused_when_strict(
    breast_run, tmp_path, capsys
):
    images = np.load(breast_run.parent.parent / "synthetic" / "breastmnist_npy" / "test_images.npy")
    big = tmp_path / "big.png"
    Image.fromarray(images[9]).resize((56, 40), Image.Resampling.NEAREST).save(big)
    code, stdout, stderr = run_query(capsys, "--run", breast_run, big, "--out", tmp_path / "g.png")
    assert code == 0
    assert "resized from 56 x 40 to 28 x 28 px" in stderr
    assert len(printed_neighbours(stdout)["big.png"]) == 5
    code, _, stderr = run_query(
        capsys, "--run", breast_run, big, "--strict", "--out", tmp_path / "s.png"
    )
    assert code == 2
    assert "--strict forbids" in stderr and "resized" in stderr
    assert not (tmp_path / "s.png").exists()


def test_a_database_built_by_another_extractor_is_refused(breast_run, tmp_path, capsys):
    entry = json.loads((breast_run / "metrics.json").read_text())["database_entry"]
    code, _, stderr = run_query(
        capsys,
        "--index=0",
        "--store-entry",
        entry,
        "experiment=offline",
        "model=timm",
        "model.model_name=resnet18",
        *dir_overrides(breast_run.parent.parent),
        "--out",
        tmp_path / "never.png",
    )
    assert code == 2
    assert "database built by another extractor" in stderr
    assert "PixelExtractor" in stderr and "TimmExtractor" in stderr
    assert not (tmp_path / "never.png").exists()


def test_random_weights_come_back_from_the_runs_seed_and_are_verified(resnet_run, tmp_path, capsys):
    code, stdout, _ = run_query(
        capsys, "--run", resnet_run, "--index=42", "--out", tmp_path / "r.png"
    )
    assert code == 0
    printed = printed_neighbours(stdout)["test[42]"]
    saved = np.load(resnet_run / "neighbors.npz")
    assert [r for r, _, _ in printed] == saved["indices"][42].tolist()
    np.testing.assert_allclose([d for _, _, d in printed], saved["distances"][42], rtol=1e-4)
    # another seed draws other random weights; the seed is in the extractor identity (it used to
    # be caught only by re-embedding a few database rows), so the other seed is refused at once
    code, _, stderr = run_query(capsys, "--run", resnet_run, "--index=42", "model.seed=1")
    assert code == 2 and "database built by another extractor" in stderr
    assert "seed" in stderr


@pytest.mark.parametrize(
    ("shape", "message"),
    [((28, 28, 28), "is a volume or a stack"), ((4, 1, 28, 28), "is a volume or a stack")],
)
def test_arrays_of_the_wrong_dimensionality_are_refused(
    breast_run, tmp_path, capsys, shape, message
):
    np.save(tmp_path / "q.npy", np.zeros(shape, dtype=np.uint8))
    code, _, stderr = run_query(
        capsys, "--run", breast_run, tmp_path / "q.npy", "--out", tmp_path / "x.png"
    )
    assert code == 2
    assert message in stderr and "grayscale images 28 x 28" in stderr


def test_bad_arguments_fail_before_any_work(breast_run, tmp_path, capsys):
    code, _, stderr = run_query(capsys, "--run", breast_run, "--index=156")
    assert code == 2 and "outside test (rows 0..155)" in stderr
    code, _, stderr = run_query(capsys, "--run", breast_run)
    assert code == 2 and "give at least one query" in stderr
    code, _, stderr = run_query(capsys, "--run", breast_run, "--index=0", "model=resnet50")
    assert code == 2 and "picks a config group" in stderr
    code, _, stderr = run_query(capsys, "--run", breast_run, "--index=0", "--device=tpu")
    assert code == 2 and "--device='tpu'; choose one of auto, cpu, cuda" in stderr
    for text in ([], ["--text", "a mass"]):  # image and text queries write the same PNG grid
        code, _, stderr = run_query(capsys, "--run", breast_run, "--index=0", "--out=g.jpg", *text)
        assert code == 2 and "--out must name a .png file, not g.jpg" in stderr


def test_volume_queries_search_a_3d_database(volume_run, tmp_path, capsys):
    volumes = np.load(volume_run.parent.parent / "vols_npy" / "test_images.npy")
    np.save(tmp_path / "vol.npy", volumes[11])
    np.save(tmp_path / "big.npy", volumes[11].repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2))
    code, stdout, stderr = run_query(
        capsys,
        "--run",
        volume_run,
        tmp_path / "vol.npy",
        tmp_path / "big.npy",
        "--index=11",
        "--out",
        tmp_path / "v.png",
    )
    assert code == 0
    expected = np.load(volume_run / "neighbors.npz")["indices"][11].tolist()
    tables = printed_neighbours(stdout)
    assert [r for r, _, _ in tables["vol.npy"]] == expected
    assert [r for r, _, _ in tables["test[11]"]] == expected
    assert "big.npy: volume resized from 32 x 32 x 32 to 16 x 16 x 16" in stderr
    assert {lab for _, lab, _ in tables["test[11]"]} <= set(VOLUME_CLASSES)
    assert "label: busy" in stdout  # test row 11 is class 1, named by data.label_names
    with Image.open(tmp_path / "v.png") as grid:
        assert grid.size == expected_size(GridLayout(), 3, 6)
    Image.fromarray(volumes[11][8]).save(tmp_path / "slice.png")
    code, _, stderr = run_query(capsys, "--run", volume_run, tmp_path / "slice.png")
    assert code == 2 and "is a 2D picture but the database holds volumes 16 x 16 x 16" in stderr


def test_console_script_reports_a_non_run_directory_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cbmir.query.cli", "--run", str(tmp_path), "--index", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2
    assert "is not a finished cbmir run" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
