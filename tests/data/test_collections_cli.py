"""The real `cbmir` on own collections: `model=pixels` on the folder, DICOM, CSV and NIfTI forms
of the same digits gives exactly the metrics of their `.npz` form. Slow (real processes); the
default suite pins the same rule on the decoded arrays (tests/data/test_collections.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.data.collection_files import (
    digits,
    sorted_items,
    volumes,
    write_dicom_tree,
    write_nifti_tree,
    write_npz,
    write_png_tree,
    write_table,
)
from tests.helpers import run_cbmir

BASE = ["model=pixels", "logger=csv", "trainer.enable_progress_bar=false", "gallery.n_queries=0"]
NOT_METRICS = (
    "seconds",
    "time",
    "entry",
    "sha256",
    "data_",
    "skipped",
    "embedded",
    "dataset",
    "name",
)


def metrics(out: Path) -> dict:
    """The retrieval figures of a job's metrics.json (no timings, names or data checksums)."""
    found = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in found.items() if not any(w in k for w in NOT_METRICS)}


def run_jobs(tmp: Path, name: str, *overrides: str, multirun: bool = False) -> list[Path]:
    """Run cbmir (a multirun when asked) into tmp/name; the job folders."""
    out = tmp / name
    where = [f"hydra.sweep.dir={out}"] if multirun else [f"hydra.run.dir={out}"]
    args = ["-m"] if multirun else []
    run_cbmir([*args, *BASE, *where, f"++data.cache_dir={tmp / 'cache'}", *overrides], tmp)
    if not multirun:
        return [out]
    return sorted(p.parent for p in out.glob("*/metrics.json"))


@pytest.mark.slow  # two cbmir processes (~25 s on a quiet machine); arrays: test_collections.py
def test_folder_and_dicom_forms_give_the_npz_metrics(tmp_path):
    images, labels, splits = digits(90)
    names = write_png_tree(tmp_path / "png", images, labels, splits)
    write_dicom_tree(tmp_path / "dcm8", images, labels, splits, bits=8)
    write_dicom_tree(tmp_path / "dcm16", images, labels, splits, bits=16)
    images, labels, splits = sorted_items(names, images, labels, splits)
    npz = write_npz(tmp_path / "digits.npz", images, labels, splits)
    (expected,) = run_jobs(tmp_path, "npz", "data=npz", f"data.path={npz}")
    want = metrics(expected)
    assert want["n_queries"] == 30 and 0 < want["map@5"] < 1
    jobs = run_jobs(
        tmp_path,
        "folders",
        "data=folder",
        f"data.path={tmp_path / 'png'},{tmp_path / 'dcm8'},{tmp_path / 'dcm16'}",
        multirun=True,
    )
    assert len(jobs) == 3
    for job in jobs:
        assert metrics(job) == want, job


@pytest.mark.slow
def test_csv_and_nifti_forms_give_the_npz_metrics(tmp_path):
    images, labels, splits = digits(90)
    names = write_png_tree(tmp_path / "png", images, labels, splits)
    images, labels, splits, names = sorted_items(names, images, labels, splits, names)
    table = write_table(tmp_path / "digits.tsv", [f"png/{n}" for n in names], labels, splits, "\t")
    npz = write_npz(tmp_path / "digits.npz", images, labels, splits)
    (expected,) = run_jobs(tmp_path, "npz", "data=npz", f"data.path={npz}")
    (csv,) = run_jobs(tmp_path, "csv", "data=csv", f"data.path={table}")
    assert metrics(csv) == metrics(expected)

    vols, vlabels, vsplits = volumes(45)
    vnames = write_nifti_tree(tmp_path / "nii", vols, vlabels, vsplits)
    vols, vlabels, vsplits = sorted_items(vnames, vols, vlabels, vsplits)
    npz3 = write_npz(tmp_path / "vols.npz", vols, vlabels, vsplits)
    (expected3,) = run_jobs(tmp_path, "npz3", "data=npz", f"data.path={npz3}", "data.volumes=true")
    (nifti,) = run_jobs(tmp_path, "nifti", "data=folder", f"data.path={tmp_path / 'nii'}")
    assert metrics(nifti) == metrics(expected3)


@pytest.mark.slow  # a cbmir process; the message itself: test_collections.py
def test_unreadable_file_is_one_line_exit_2_before_embedding(tmp_path):
    images, labels, splits = digits(15)
    write_png_tree(tmp_path / "png", images, labels, splits)
    (tmp_path / "png" / "train" / "0" / "broken.png").write_bytes(b"\x89PNG broken")
    proc = run_cbmir(
        [
            *BASE,
            f"hydra.run.dir={tmp_path / 'out'}",
            f"++data.cache_dir={tmp_path / 'cache'}",
            "data=folder",
            f"data.path={tmp_path / 'png'}",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    said = proc.stdout + proc.stderr
    assert "1 unreadable files:" in said and "broken.png" in said
    assert "Traceback" not in said
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.npy"))
