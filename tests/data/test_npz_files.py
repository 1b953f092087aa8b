import hashlib
import io
import json
import os
import urllib.error
import zipfile

import medmnist
import numpy as np
import pytest

from cbmir.data import files
from cbmir.data.files import convert_npz_to_npy, load_split_arrays, npz_path, read_manifest
from cbmir.errors import DataError


def write_npz(path, n=(6, 3, 4), item=(8, 8), cols=1, dtype=np.uint8, seed=0, skip=()):
    """A small custom npz in MedMNIST layout."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, m in zip(("train", "val", "test"), n, strict=True):
        if split in skip:
            continue
        arrays[f"{split}_images"] = rng.integers(0, 256, (m, *item)).astype(dtype)
        arrays[f"{split}_labels"] = rng.integers(0, 3, (m, cols))
    np.savez(path, **arrays)
    return path


def test_npz_path_layout(tmp_path):
    assert npz_path(tmp_path, "breastmnist", 28) == tmp_path / "breastmnist.npz"
    assert npz_path(tmp_path, "breastmnist", 64) == tmp_path / "breastmnist_64.npz"


def test_converts_once(tmp_path):
    src = write_npz(tmp_path / "own.npz")
    out = convert_npz_to_npy(src, expected_n={"train": 6, "val": 3, "test": 4})
    assert out == tmp_path / "own_npy"
    manifest = read_manifest(out)
    assert manifest["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert manifest["layout"] == "gray2d" and manifest["image_shape"] == [1, 8, 8]
    images, labels = load_split_arrays(out, "val")
    assert isinstance(images, np.memmap) and images.shape == (3, 8, 8)
    assert np.array_equal(images, np.load(src)["val_images"])
    assert labels.dtype == np.int64 and labels.shape == (3, 1)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert convert_npz_to_npy(src) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_stale_source_is_reconverted(tmp_path):
    src = write_npz(tmp_path / "own.npz", seed=0)
    out = convert_npz_to_npy(src)
    old_sha = read_manifest(out)["source"]["sha256"]
    write_npz(src, seed=1)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    convert_npz_to_npy(src)
    assert read_manifest(out)["source"]["sha256"] != old_sha
    assert np.array_equal(load_split_arrays(out, "train")[0], np.load(src)["train_images"])


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path, monkeypatch):
    src = write_npz(tmp_path / "own.npz")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "_write_labels", boom)  # images already written at this point
    with pytest.raises(KeyboardInterrupt):
        convert_npz_to_npy(src)
    # besides the source only the lock and the checksum cache (both small, both kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".own.npz.digests.json",
        ".own_npy.lock",
        "own.npz",
    ]
    monkeypatch.undo()
    assert read_manifest(convert_npz_to_npy(src))["splits"]["test"]["n"] == 4


def test_partial_directory_is_not_trusted(tmp_path):
    src = write_npz(tmp_path / "own.npz")
    partial = tmp_path / "own_npy"
    partial.mkdir()
    np.save(partial / "train_images.npy", np.zeros((1, 2, 2), np.uint8))  # a killed old run
    with pytest.raises(DataError, match="not a finished conversion"):
        load_split_arrays(partial, "train")
    assert convert_npz_to_npy(src) == partial
    assert load_split_arrays(partial, "train")[0].shape == (6, 8, 8)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(DataError, match=r"bad\.npz is not a readable"):
        convert_npz_to_npy(bad)
    src = write_npz(tmp_path / "cut.npz")
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # interrupted download
    with pytest.raises(DataError, match=r"cut\.npz"):
        convert_npz_to_npy(src)
    assert not (tmp_path / "cut_npy").exists()


def test_missing_keys_lists_present(tmp_path):
    src = tmp_path / "half.npz"
    np.savez(src, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(DataError, match=r"half\.npz lacks test_images, test_labels.*train_images"):
        convert_npz_to_npy(src)


def test_val_is_optional(tmp_path):
    out = convert_npz_to_npy(write_npz(tmp_path / "noval.npz", skip=("val",)))
    assert list(read_manifest(out)["splits"]) == ["train", "test"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"train_images": np.zeros((2, 16), np.uint8)}, "train_images has shape"),
        ({"train_labels": np.zeros((2, 1, 1))}, "train_labels has shape"),
        ({"train_labels": np.zeros((3, 1))}, "train has 2 images but 3 labels"),
        ({"train_images": np.zeros((2, 3, 8, 8), np.uint8)}, "channels-first"),
        ({"train_images": np.full((2, 4, 4), 300, np.uint16)}, r"outside \[0, 255\]"),
        ({"train_images": np.full((2, 4, 4), -1.0)}, "Rescale them to uint8"),
        ({"train_images": np.zeros((2, 5, 5), np.uint8)}, "do not match the other splits"),
        ({"train_labels": np.full((2, 1), 0.5)}, "non-integer"),
        ({"train_images": np.array([["a"] * 4] * 2)}, "expected uint8 images"),
    ],
)
def test_bad_arrays(tmp_path, arrays, message):
    base = {
        "train_images": np.zeros((2, 4, 4), np.uint8),
        "train_labels": np.zeros((2, 1), np.int64),
        "test_images": np.zeros((1, 4, 4), np.uint8),
        "test_labels": np.zeros((1, 1), np.int64),
    }
    src = tmp_path / "weird.npz"
    np.savez(src, **{**base, **arrays})
    with pytest.raises(DataError, match=message) as err:
        convert_npz_to_npy(src)
    assert "weird.npz" in str(err.value)
    assert not (tmp_path / "weird_npy").exists()


def test_expected_counts_like_medmnist(tmp_path):
    src = write_npz(tmp_path / "breastmnist.npz")
    with pytest.raises(DataError, match="train has 6 images, expected 546"):
        convert_npz_to_npy(src, expected_n={"train": 546, "val": 78, "test": 156})


def test_float_images_are_scaled(tmp_path):
    src = tmp_path / "float.npz"
    unit = np.linspace(0, 1, 2 * 16).reshape(2, 4, 4)
    np.savez(
        src,
        train_images=unit,
        train_labels=np.zeros((2, 1)),
        test_images=unit * 255,
        test_labels=np.ones(2, np.uint8),  # 1-D labels become N x 1
    )
    out = convert_npz_to_npy(src)
    train, _ = load_split_arrays(out, "train")
    test, labels = load_split_arrays(out, "test")
    assert train.dtype == np.uint8 and train.max() == 255 and np.array_equal(train, test)
    assert labels.shape == (2, 1)


def test_volume_detection(tmp_path):
    src = write_npz(tmp_path / "ambiguous.npz", item=(4, 8, 3))
    assert read_manifest(convert_npz_to_npy(src))["layout"] == "rgb2d"
    forced = read_manifest(convert_npz_to_npy(src, volumes=True))  # re-converted as asked
    assert forced["layout"] == "volume" and forced["image_shape"] == [4, 8, 3]
    vol = write_npz(tmp_path / "vol.npz", item=(5, 8, 8))
    assert read_manifest(convert_npz_to_npy(vol))["image_shape"] == [5, 8, 8]
    with pytest.raises(DataError, match="volumes=False"):
        convert_npz_to_npy(vol, volumes=False)


def test_cache_dir(tmp_path):
    src = write_npz(tmp_path / "own.npz")
    out = convert_npz_to_npy(src, cache_dir=tmp_path / "cache")
    assert out == tmp_path / "cache" / "own_npy" and (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["source"]["name"] == "own.npz"


def test_download_failure_is_a_clear_data_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv

    def offline(**kwargs):
        (tmp_path / kwargs["filename"]).write_bytes(b"partial")
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv, "download_url", offline)
    with pytest.raises(DataError) as err:
        files.download_npz("breastmnist", 64, tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "breastmnist_64.npz") in msg
    assert "https://zenodo.org/records/10519652/files/breastmnist_64.npz" in msg
    assert "data.root" in msg and err.value.__cause__ is None
    # no partial file that would look like data; only the (kept) download lock
    assert [p.name for p in tmp_path.iterdir()] == [".breastmnist_64.npz.lock"]


def test_a_bug_under_the_download_is_a_traceback_not_a_data_error(tmp_path, monkeypatch):
    """Only what a failed download raises becomes the one-line DataError; a TypeError (a bug)
    keeps its traceback, and the part file is still removed."""
    import torchvision.datasets.utils as tv

    def buggy(**kwargs):
        (tmp_path / kwargs["filename"]).write_bytes(b"partial")
        raise TypeError("download_url() got an unexpected keyword argument")

    monkeypatch.setattr(tv, "download_url", buggy)
    with pytest.raises(TypeError):
        files.download_npz("breastmnist", 64, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".breastmnist_64.npz.lock"]


def test_download_uses_medmnist_url_and_md5(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv

    calls = []

    def fake(url, root, filename, md5):
        calls.append((url, md5))
        write_npz(os.path.join(root, filename) + ".npz")  # np.savez adds a suffix
        os.replace(os.path.join(root, filename) + ".npz", os.path.join(root, filename))

    monkeypatch.setattr(tv, "download_url", fake)
    path = files.download_npz("organmnist3d", 64, tmp_path / "new")
    assert path == tmp_path / "new" / "organmnist3d_64.npz" and path.is_file()
    info = medmnist.INFO["organmnist3d"]
    assert calls == [(info["url_64"], info["MD5_64"])]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_streams_in_chunks_compressed_and_fortran(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(files, "_CHUNK_BYTES", 100)  # many small blocks per split
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, 6, 5, 3)).astype(dtype)
    src = tmp_path / "packed.npz"
    np.savez_compressed(
        src,
        train_images=images,
        train_labels=np.arange(9)[:, None],
        test_images=np.asfortranarray(images[:4]),
        test_labels=np.zeros((4, 1), np.int32),
    )
    out = convert_npz_to_npy(src)
    assert np.array_equal(load_split_arrays(out, "train")[0], images.astype(np.uint8))
    assert np.array_equal(load_split_arrays(out, "test")[0], images[:4].astype(np.uint8))


def write_npz_members(path, arrays, version, stamp=None):
    """An npz whose members are `.npy` files of format `version` (stamped `stamp` if given)."""
    with zipfile.ZipFile(path, "w") as zf:
        for key, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array, version=version)
            data = buf.getvalue()
            if stamp is not None:  # another version number in the magic bytes
                data = data.replace(np.lib.format.magic(*version), b"\x93NUMPY" + bytes(stamp), 1)
            zf.writestr(f"{key}.npy", data)
    return path


def test_npy_format_3_0_members_are_read(tmp_path):
    """numpy writes format 3.0 (UTF-8 header) on request; numpy has no public 3.0 header reader,
    and calling its private one crashed with AttributeError on numpy 2.x."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (5, 6, 6), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, (5, 1)),
        "test_images": rng.integers(0, 256, (2, 6, 6), dtype=np.uint8),
        "test_labels": rng.integers(0, 3, (2, 1)),
    }
    src = write_npz_members(tmp_path / "utf8.npz", arrays, version=(3, 0))
    out = convert_npz_to_npy(src)
    for split in ("train", "test"):
        images, labels = load_split_arrays(out, split)
        assert np.array_equal(images, arrays[f"{split}_images"])
        assert np.array_equal(labels, arrays[f"{split}_labels"])
    # the one case where UTF-8 and latin-1 headers differ: a non-ASCII structured field name
    named = {**arrays, "train_images": np.zeros((5, 6, 6), dtype=[("\u00e9", "u1")])}
    src = write_npz_members(tmp_path / "named.npz", named, version=(3, 0))
    with pytest.raises(DataError, match=r"named\.npz: train_images has dtype .*expected uint8"):
        convert_npz_to_npy(src)


def test_unknown_npy_format_version_is_a_data_error(tmp_path):
    arrays = {
        k: np.zeros((2, 4, 4) if k.endswith("images") else (2, 1), np.uint8)
        for k in ("train_images", "train_labels", "test_images", "test_labels")
    }
    src = write_npz_members(tmp_path / "future.npz", arrays, version=(3, 0), stamp=(9, 0))
    with pytest.raises(DataError, match=r"future\.npz is not a readable.*format version 9\.0"):
        convert_npz_to_npy(src)
    assert not (tmp_path / "future_npy").exists()
