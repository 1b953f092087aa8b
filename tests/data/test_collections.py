"""Own collections (`data=folder`, `data=csv`): every form of the same digits decodes to exactly
the arrays of their `.npz`; bad input stops before any embedding with a message naming the
files; the split file is reused; the cache follows changed, added and removed files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.data.collection_files import (
    DICOM16_TAGS,
    digits,
    sorted_items,
    volumes,
    write_dicom,
    write_dicom_tree,
    write_nifti_tree,
    write_npz,
    write_png_tree,
    write_table,
)

from cbmir.data import CollectionDataModule, NpzDataModule
from cbmir.data.decode import DecodeSettings, fit, read_item
from cbmir.errors import ConfigError, DataError


def module(path: Path, tmp_path: Path, **kwargs) -> CollectionDataModule:
    dm = CollectionDataModule(path, cache_dir=tmp_path / "cache", **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def assert_same_data(dm, npz_dm) -> None:
    assert dm.splits == npz_dm.splits
    assert dm.image_shape == npz_dm.image_shape and dm.is_volume == npz_dm.is_volume
    for split in dm.splits:
        np.testing.assert_array_equal(dm.images(split), npz_dm.images(split))
        np.testing.assert_array_equal(dm.labels(split), npz_dm.labels(split))


def npz_module(tmp_path: Path, images, labels, splits) -> NpzDataModule:
    path = write_npz(tmp_path / "digits.npz", images, labels, splits)
    dm = NpzDataModule(path, cache_dir=tmp_path / "npy")
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def digit_items():
    return digits(60)


@pytest.mark.parametrize("form", ["png-folder", "png-csv", "dicom8", "dicom16"])
def test_2d_forms_decode_to_the_npz_arrays(tmp_path, digit_items, form):
    images, labels, splits = digit_items
    root = tmp_path / "collection"
    if form.startswith("png"):
        names = write_png_tree(root, images, labels, splits)
    else:
        names = write_dicom_tree(root, images, labels, splits, bits=int(form[5:]))
    images, labels, splits, names = sorted_items(names, images, labels, splits, names)
    if form == "png-csv":  # paths relative to the table's folder, rows in that order
        dm = module(
            write_table(tmp_path / "t.csv", [f"collection/{n}" for n in names], labels, splits),
            tmp_path,
            kind="csv",
        )
    else:
        dm = module(root, tmp_path)
    assert_same_data(dm, npz_module(tmp_path, images, labels, splits))
    assert dm.label_names == {i: str(i) for i in range(5)}
    assert dm.split_files("test")[0].endswith(names[[s for s in splits].index("test")])


def test_nifti_volumes_decode_to_the_npz_volumes(tmp_path):
    vols, labels, splits = volumes(24)
    names = write_nifti_tree(tmp_path / "vols", vols, labels, splits)
    vols, labels, splits, names = sorted_items(names, vols, labels, splits, names)
    dm = module(tmp_path / "vols", tmp_path)
    assert dm.is_volume and dm.image_shape == (6, 28, 28)
    assert_same_data(dm, npz_module(tmp_path, vols, labels, splits))


def test_dicom_series_folder_is_one_volume_in_slice_order(tmp_path):
    vol = volumes(1, depth=4)[0][0]
    series = tmp_path / "series"
    for z in (2, 0, 3, 1):  # file names out of order; ImagePositionPatient decides
        write_dicom(
            series / f"s{(7 * z) % 5}.dcm",
            vol[z],
            ImagePositionPatient=[0, 0, 5 * z],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        )
    np.testing.assert_array_equal(read_item(series, None), vol)


def test_dicom_windowing_rules(tmp_path):
    pixels = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    # no window: per-image min-max
    plain = read_item(write_dicom(tmp_path / "a.dcm", pixels), None)
    np.testing.assert_array_equal(plain, np.rint(pixels / 4000 * 255).astype(np.uint8))
    # the file's window (LINEAR, DICOM PS3.3 C.11.2.1.2): below/above clip to 0/255
    windowed = read_item(
        write_dicom(tmp_path / "b.dcm", pixels, WindowCenter=1500.5, WindowWidth=1001), None
    )
    np.testing.assert_array_equal(windowed, [[0, 0], [255, 255]])
    # MONOCHROME1: low values are bright
    inverted = read_item(
        write_dicom(tmp_path / "c.dcm", pixels, PhotometricInterpretation="MONOCHROME1"), None
    )
    np.testing.assert_array_equal(inverted, 255 - plain)
    # data.window wins over the file's window
    np.testing.assert_array_equal(read_item(tmp_path / "b.dcm", (0.0, 4000.0)), plain)


def test_sixteen_bit_png_maps_min_max_or_window(tmp_path):
    pixels = np.array([[100, 300], [500, 1100]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_array_equal(
        read_item(tmp_path / "a.png", None), np.rint((pixels - 100) / 1000 * 255)
    )
    np.testing.assert_array_equal(
        read_item(tmp_path / "a.png", (0, 65535)), np.rint(pixels / 65535 * 255)
    )


@pytest.mark.parametrize(
    ("policy", "expect"), [("squash", (16, 16)), ("pad", (16, 16)), ("shortest", (16, 16))]
)
def test_resize_policies(policy, expect):
    wide = np.full((10, 40), 200, dtype=np.uint8)
    out = fit(wide, DecodeSettings(16, policy), color=False, volume=False)
    assert out.shape == expect
    if policy == "pad":  # fitted inside: black bands above and below
        assert out[0].max() == 0 and out[8, 8] == 200
    else:
        assert out.min() > 150
    vol = fit(np.full((4, 8, 16), 90, np.uint8), DecodeSettings(8, policy), False, True)
    assert vol.shape == (8, 8, 8)


def test_mixed_sizes_stop_unless_data_size(tmp_path):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for side in (20, 24):
                (tmp_path / "m" / split / cls).mkdir(parents=True, exist_ok=True)
                Image.new("L", (side, side), 9).save(tmp_path / "m" / split / cls / f"{side}.png")
    with pytest.raises(DataError, match=r"2 different sizes.*set data\.size=N"):
        module(tmp_path / "m", tmp_path)
    dm = module(tmp_path / "m", tmp_path, size=16)
    assert dm.image_shape == (1, 16, 16) and dm.images("train").shape == (4, 16, 16)


# --------------------------------------------------------------------------- bad input


def tree(root: Path, n: int = 2, classes=("a", "b"), splits=("train", "test")) -> Path:
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("L", (8, 8), 40 * i + 1).save(root / split / cls / f"{i}.png")
    return root


def test_corrupt_files_stop_naming_them_or_are_skipped_and_listed(tmp_path):
    root = tree(tmp_path / "c", n=3)
    for i in range(7):
        (root / "train" / "a" / f"bad{i}.png").write_bytes(b"not a picture")
    with pytest.raises(DataError, match=r"7 unreadable files: .*bad0\.png.*\(and 2 more\)"):
        module(root, tmp_path)
    assert not list((tmp_path / "cache").glob("c-*"))  # nothing half-decoded installed
    dm = module(root, tmp_path, on_error="skip")
    assert len(dm.labels("train")) == 6
    assert len(dm.skipped_files.splitlines()) == 7 and dm.data_facts()["skipped_files"] == 7


def test_truncated_png_found_while_decoding(tmp_path):
    root = tree(tmp_path / "t", n=2)
    good = (root / "test" / "a" / "0.png").read_bytes()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(root / "test" / "b" / "0.png")
    data = (root / "test" / "b" / "0.png").read_bytes()
    (root / "test" / "b" / "0.png").write_bytes(data[: len(data) - 30])  # header fine, data cut
    assert good
    with pytest.raises(DataError, match=r"1 unreadable files: .*test/b/0\.png"):
        module(root, tmp_path)


def test_csv_errors_name_the_rows(tmp_path):
    tree(tmp_path / "c")
    rows = [(f"c/{s}/{c}/{i}.png", c, s) for s in ("train", "test") for c in "ab" for i in (0, 1)]
    write_table(tmp_path / "ok.csv", *map(list, zip(*rows, strict=True)))
    assert module(tmp_path / "ok.csv", tmp_path, kind="csv").num_classes == 2
    gone = [("c/train/a/9.png", "a", "train"), *rows]
    write_table(tmp_path / "gone.csv", *map(list, zip(*gone, strict=True)))
    with pytest.raises(DataError, match=r"do not exist: 1 paths: .*train/a/9\.png"):
        module(tmp_path / "gone.csv", tmp_path, kind="csv")
    blank = [(p, "" if i == 2 else c, s) for i, (p, c, s) in enumerate(rows)]
    write_table(tmp_path / "blank.csv", *map(list, zip(*blank, strict=True)))
    with pytest.raises(DataError, match=r"label is missing for 1 files: .*train/b/0\.png"):
        module(tmp_path / "blank.csv", tmp_path, kind="csv")
    with pytest.raises(DataError, match=r"lacks the column\(s\) label"):
        (tmp_path / "nolabel.csv").write_text("path,split\nc/train/a/0.png,train\n")
        module(tmp_path / "nolabel.csv", tmp_path, kind="csv")
    (tmp_path / "empty.csv").write_text("path,label,split\n")
    with pytest.raises(DataError, match=r"empty\.csv lists no files"):
        module(tmp_path / "empty.csv", tmp_path, kind="csv")
    with pytest.raises(DataError, match=r"missing\.csv does not exist"):
        module(tmp_path / "missing.csv", tmp_path, kind="csv")


def test_empty_split_and_test_only_class(tmp_path):
    with pytest.raises(DataError, match=r"the test split has no images"):
        module(tree(tmp_path / "e", splits=("train",)), tmp_path)
    root = tree(tmp_path / "o")
    tree(root, classes=("zebra",), splits=("test",))
    with pytest.raises(DataError, match=r"1 classes: zebra appear only in the test split"):
        module(root, tmp_path)


def test_dicom_without_pixels_and_4d_nifti(tmp_path):
    import nibabel as nib

    root = tree(tmp_path / "d")
    write_dicom(root / "train" / "a" / "empty.dcm", np.zeros((8, 8), np.uint8), with_pixels=False)
    with pytest.raises(DataError, match=r"1 unreadable files: .*empty\.dcm.*without pixel data"):
        module(root, tmp_path)
    vol4 = tmp_path / "v" / "train" / "a" / "t.nii.gz"
    vol4.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.uint8), np.eye(4)), vol4)
    with pytest.raises(DataError, match=r"t\.nii\.gz: a 4D NIfTI"):
        read_item(vol4, None)


def test_multi_frame_dicom_refused(tmp_path):
    path = write_dicom(
        tmp_path / "m.dcm", np.zeros((2, 4, 4), np.uint8).reshape(8, 4), NumberOfFrames=2
    )
    with pytest.raises(DataError, match=r"multi-frame DICOM"):
        from cbmir.data.decode import read_header

        read_header(path)


# --------------------------------------------------------------------------- splits and cache


def flat_tree(root: Path, n: int = 10) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (8, 8), 10 * i + (cls == "b")).save(root / cls / f"{i}.png")
    return root


def test_drawn_split_is_stratified_written_and_reused(tmp_path):
    root = flat_tree(tmp_path / "f")
    dm = module(root, tmp_path, split_seed=3, split_fractions={"train": 0.7, "test": 0.3})
    assert [len(dm.labels(s)) for s in dm.splits] == [14, 6]
    assert np.bincount(dm.labels("test").ravel()).tolist() == [3, 3]
    (split_file,) = (tmp_path / "cache").glob("f-split-*.csv")
    text = split_file.read_text()
    split_file.unlink()  # the same seed draws the same split again
    module(root, tmp_path, split_seed=3, split_fractions={"train": 0.7, "test": 0.3})
    assert split_file.read_text() == text
    # a later run follows the file, even where a fresh draw would differ
    first_test = next(line for line in text.splitlines() if line.endswith(",test"))
    moved = text.replace(first_test, first_test[: -len("test")] + "train")
    split_file.write_text(moved)
    again = module(root, tmp_path, split_seed=3, split_fractions={"train": 0.7, "test": 0.3})
    assert len(again.labels("test")) == 5
    Image.new("L", (8, 8), 1).save(root / "a" / "new.png")
    with pytest.raises(DataError, match=r"changed since its split was drawn .*1 added: .*new"):
        module(root, tmp_path, split_seed=3, split_fractions={"train": 0.7, "test": 0.3})


def test_cache_reused_and_follows_changed_added_removed_files(tmp_path):
    root = tree(tmp_path / "k", n=3)
    first = module(root, tmp_path)
    manifest = Path(first._prepare()) / "manifest.json"
    inode = manifest.stat().st_ino
    assert module(root, tmp_path).identity("train") == first.identity("train")
    assert manifest.stat().st_ino == inode  # reused, not decoded again

    target = root / "train" / "a" / "0.png"
    stat = target.stat()
    Image.new("L", (8, 8), 222).save(target)  # same size, mtime put back (as cp -p would)
    assert target.stat().st_size == stat.st_size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = module(root, tmp_path)
    assert changed.images("train")[0].max() == 222
    assert changed.identity("train")["source_sha256"] != first.identity("train")["source_sha256"]

    shutil.copy(root / "train" / "b" / "0.png", root / "train" / "b" / "9.png")
    assert len(module(root, tmp_path).labels("train")) == 7
    (root / "test" / "b" / "2.png").unlink()
    assert len(module(root, tmp_path).labels("test")) == 5


def test_unfinished_cache_folder_is_not_trusted(tmp_path):
    root = tree(tmp_path / "u")
    dm = module(root, tmp_path)
    folder = dm._prepare()
    (folder / "manifest.json").unlink()  # as if a writer died before the manifest
    np.save(folder / "train_images.npy", np.zeros((4, 8, 8), np.uint8))
    again = module(root, tmp_path)
    np.testing.assert_array_equal(again.images("train"), dm.images("train"))
    assert again.images("train").max() > 0


def test_input_files_name_the_tree_and_every_file(tmp_path):
    root = tree(tmp_path / "i")
    from cbmir.pipeline import input_files

    files = input_files(module(root, tmp_path), [])  # what job.json stamps for resume
    assert root in files and root / "train" / "a" in files
    assert (root / "test" / "b" / "1.png").resolve() in files
    link = tmp_path / "link"  # data.path through a link: the link as named is an input too
    link.symlink_to(root)
    assert link in input_files(module(link, tmp_path), [])
    series = tmp_path / "series"
    for z in range(2):
        write_dicom(series / f"{z}.dcm", np.full((8, 8), z, np.uint8))
    table = tmp_path / "vols.csv"
    table.write_text(f"path,label,split\n{series},a,train\n{series},a,test\n")
    files = module(table, tmp_path, kind="csv").input_files()
    assert table in files and series / "1.dcm" in files  # a slice edited in place counts


def test_query_files_in_dicom_and_nifti_are_decoded_like_the_collection(tmp_path):
    import nibabel as nib

    from cbmir.query.inputs import ItemSpec, load_query

    image = digits(1)[0][0]
    dcm = write_dicom(tmp_path / "q.dcm", image.astype(np.uint16) * 257, **DICOM16_TAGS)
    item = load_query(dcm, ItemSpec((1, 28, 28), False))
    np.testing.assert_array_equal(item.image[0].numpy(), image)
    vol = volumes(1, depth=5)[0][0]
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "q.nii.gz")
    item = load_query(tmp_path / "q.nii.gz", ItemSpec((5, 28, 28), True))
    np.testing.assert_array_equal(item.image.numpy(), vol)
    windowed = load_query(dcm, ItemSpec((1, 28, 28), False), window=(0.0, 65535.0))
    assert not np.array_equal(windowed.image[0].numpy(), image)  # the database's window applies


def test_runs_with_other_settings_or_changed_files_never_mix_caches(tmp_path):
    root = tree(tmp_path / "s")
    small = CollectionDataModule(root, cache_dir=tmp_path / "cache")
    small.prepare_data()
    big = module(root, tmp_path, size=16)  # another run, other settings, meanwhile
    small.setup()
    assert small.image_shape == (1, 8, 8) and big.image_shape == (1, 16, 16)
    assert small.images("train").shape == (4, 8, 8)

    stale = CollectionDataModule(root, cache_dir=tmp_path / "cache")
    stale.prepare_data()
    Image.new("L", (8, 8), 77).save(root / "train" / "a" / "0.png")
    module(root, tmp_path)  # another run decodes the changed file into the same folder
    with pytest.raises(DataError, match=r"was replaced by another run"):
        stale.setup()


def test_multi_page_tiff_refused(tmp_path):
    from cbmir.data.decode import read_header

    pages = [Image.new("L", (8, 8), v) for v in (1, 2)]
    pages[0].save(tmp_path / "p.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match=r"multi-frame picture \(2 frames\)"):
        read_header(tmp_path / "p.tif")


def test_a_run_with_on_error_skip_lists_the_skipped_files_in_its_outputs(tmp_path):
    import json

    from tests.helpers import compose_config

    from cbmir.pipeline import run_retrieval

    root = tree(tmp_path / "r", n=4)
    (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG cut")
    out = tmp_path / "out"
    cfg = compose_config(
        [
            "data=folder",
            f"data.path={root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.on_error=skip",
            "model=pixels",
            "logger=csv",
            "gallery.n_queries=0",
            "trainer.enable_progress_bar=false",
            f"paths.store={tmp_path / 'store'}",
            f"paths.output_dir={out}",
        ]
    )
    run_retrieval(cfg)
    assert "broken.png" in (out / "skipped_files.txt").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_files"] == 1 and metrics["n_database"] == 8


def test_multi_label_tables_by_columns_or_names(tmp_path):
    from hydra.utils import instantiate
    from tests.helpers import compose_config

    tree(tmp_path / "c")
    files = [f"c/{s}/{c}/{i}.png" for s in ("train", "test") for c in "ab" for i in (0, 1)]
    splits = ["train"] * 4 + ["test"] * 4
    ones = ["1,0", "1,1", "0,1", "1,0"] * 2
    (tmp_path / "cols.csv").write_text(
        "path,split,effusion,nodule\n"
        + "".join(f"{f},{s},{o}\n" for f, s, o in zip(files, splits, ones, strict=True))
    )
    cfg = compose_config(
        [
            "data=csv",
            f"data.path={tmp_path / 'cols.csv'}",
            f"data.cache_dir={tmp_path / 'k'}",
            "data.columns.labels=[effusion,nodule]",
        ]
    )
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.multilabel and dm.label_names == {0: "effusion", 1: "nodule"}
    np.testing.assert_array_equal(dm.labels("train"), [[1, 0], [1, 1], [0, 1], [1, 0]])
    names = ["a", "a|b", "b", "a"] * 2
    write_table(tmp_path / "names.csv", files, names, splits)
    dm = module(tmp_path / "names.csv", tmp_path, kind="csv")
    assert dm.multilabel and dm.label_names == {0: "a", 1: "b"}
    np.testing.assert_array_equal(dm.labels("test"), [[1, 0], [1, 1], [0, 1], [1, 0]])


def test_listing_pauses_the_garbage_collector_only_while_it_lists(tmp_path):
    """`gc_paused` speeds up the per-file records; the collector must come back on after a
    listing, a failed one included, and stay off where the caller had switched it off."""
    import gc

    from cbmir.data.collection import folder_collection, gc_paused

    root = tmp_path / "tree"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / cls / "x.png")
    assert gc.isenabled()
    folder_collection(root, tmp_path / "cache", 0, {"train": 0.5, "test": 0.5})
    assert gc.isenabled()
    with pytest.raises(DataError):
        folder_collection(tmp_path / "missing", tmp_path / "cache", 0, {"train": 1.0})
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_rows_hold_the_path_text_pathlib_prints(tmp_path, monkeypatch):
    """Rows keep each file as the absolute path string the listing joined (what the stamps and
    the key's text use) and give a Path on request: the same text `Path` would print, for a
    root reached through `..`, names with spaces and non-ASCII letters, a DICOM-like folder as
    an item, hidden entries left out, and a CSV's relative `..` paths folded."""
    from cbmir.data.collection import Columns, folder_collection, table_collection

    root = tmp_path / "tree"
    names = {"a": ["x 1.png", "é.png", "Z.png"], "b b": ["0.png"]}
    for cls, files in names.items():
        (root / cls).mkdir(parents=True)
        (root / cls / ".hidden.png").write_bytes(b"")
        for name in files:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / cls / name)
    (root / "a" / "series").mkdir()
    monkeypatch.chdir(tmp_path)
    via_dotdot = Path("tree") / ".." / "tree"
    collection = folder_collection(via_dotdot, tmp_path / "cache", 0, {"train": 0.5, "test": 0.5})
    expected = sorted(
        (p for p in root.resolve().glob("*/*") if not p.name.startswith(".")),
        key=lambda p: (p.parent.name, p.name),
    )
    assert [r.file for r in collection.rows] == [str(p) for p in expected]
    assert [r.path for r in collection.rows] == expected
    assert all(isinstance(r.file, str) for r in collection.rows)

    (tmp_path / "sub").mkdir()
    table = tmp_path / "sub" / "t.csv"
    table.write_text("path,label,split\n../tree/a/x 1.png,a,train\n../tree/b b/0.png,b,test\n")
    rows = table_collection(table, Columns(), tmp_path / "cache", 0, {"train": 1.0}).rows
    assert [r.file for r in rows] == [str(root / "a" / "x 1.png"), str(root / "b b" / "0.png")]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"kind": "zip"}, r"unknown data.kind 'zip'; choose one of folder, csv"),
        ({"decode_workers": -1}, r"data.decode_workers must be an integer >= 0, got -1"),
        ({"decode_workers": 1.5}, r"data.decode_workers must be an integer >= 0, got 1.5"),
    ],
)
def test_bad_kind_or_decode_workers_fail_before_any_file_is_read(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        CollectionDataModule(tmp_path / "absent", cache_dir=tmp_path / "cache", **setting)
    assert not (tmp_path / "cache").exists()
