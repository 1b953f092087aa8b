"""The decoding pass of own collections: DataLoader workers write rows straight into the cache
and hash them, and the result must not depend on it: the same arrays and the same content
identity from 0 and 2 workers (late colour file, skipped files and all); a file changed before
it was read is refused, one changed after it was read is the next run's re-decode; every
split's unreadable files are listed together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbmir.data import CollectionDataModule
from cbmir.data import collection_cache as cache_module
from cbmir.errors import DataError


def module(path: Path, cache: Path, **kwargs) -> CollectionDataModule:
    dm = CollectionDataModule(path, cache_dir=cache, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def grey_tree(root: Path, n: int = 3) -> Path:
    """root/<train|test>/<a|b>/<i>.png, 8 x 8 grey noise."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def sha(dm: CollectionDataModule) -> str:
    return dm.identity("train")["source_sha256"]


def test_zero_and_two_workers_store_the_same_arrays_and_identity(tmp_path) -> None:
    root = grey_tree(tmp_path / "w", n=20)  # more rows than one batch per worker
    colour = np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(colour).save(root / "train" / "a" / "10.png")  # widens mid-way
    (root / "train" / "b" / "0.png").write_bytes(b"\x89PNG cut")  # skipped after the widening
    (root / "test" / "a" / "5.png").write_bytes(b"not a picture")
    dms = [module(root, tmp_path / f"cache{w}", on_error="skip", decode_workers=w) for w in (0, 2)]
    for split in ("train", "test"):
        assert dms[0].split_files(split) == dms[1].split_files(split)
        np.testing.assert_array_equal(dms[0].images(split), dms[1].images(split))
        np.testing.assert_array_equal(dms[0].labels(split), dms[1].labels(split))
    assert dms[0].image_shape == (3, 8, 8) and len(dms[0].labels("train")) == 39
    assert sha(dms[0]) == sha(dms[1])
    assert dms[0].skipped_files == dms[1].skipped_files and "0.png" in dms[0].skipped_files
    train = dms[1].images("train")
    stored = dms[1].split_files("train").index(str(root / "train" / "a" / "10.png"))
    np.testing.assert_array_equal(train[stored], colour)
    first = np.asarray(Image.open(root / "train" / "a" / "0.png"))
    np.testing.assert_array_equal(train[0], np.repeat(first[:, :, None], 3, axis=2))
    assert not [p for p in (tmp_path / "cache2").rglob("*") if ".tmp-" in p.name]


def test_identity_follows_labels_and_size_not_the_folder(tmp_path) -> None:
    root = grey_tree(tmp_path / "t", n=2)
    files = sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*.png"))
    lines = [f"{f},{f.split('/')[2]},{f.split('/')[1]}" for f in files]
    (tmp_path / "t.csv").write_text("path,label,split\n" + "\n".join(lines) + "\n")
    base = module(tmp_path / "t.csv", tmp_path / "cache", kind="csv", name="t")
    pixels, identity = np.array(base.images("train")), sha(base)
    lines[0] = lines[0].replace(",a,", ",b,")  # one label changed, pixels the same
    (tmp_path / "t.csv").write_text("path,label,split\n" + "\n".join(lines) + "\n")
    relabelled = module(tmp_path / "t.csv", tmp_path / "cache", kind="csv", name="t")
    np.testing.assert_array_equal(relabelled.images("train"), pixels)
    assert sha(relabelled) != identity
    resized = module(root, tmp_path / "cache", size=9)
    assert sha(resized) not in (identity, sha(module(root, tmp_path / "cache")))
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "t")  # same content, other place
    assert sha(module(moved, tmp_path / "cache2", name="t")) == sha(module(root, tmp_path / "c3"))


@pytest.fixture
def on_read(monkeypatch):
    """Runs `action()` just before the decoder reads `path` (the decode runs in this process
    with decode_workers=0): a real change of a real file at a chosen moment of the decode."""
    hooks: dict[Path, object] = {}
    real = cache_module.read_item

    def reading(path: Path, *args):
        if path in hooks:
            hooks.pop(path)()
        return real(path, *args)

    monkeypatch.setattr(cache_module, "read_item", reading)
    return hooks


def rewrite(path: Path, value: int) -> None:
    Image.new("L", (8, 8), value).save(path)


def test_a_file_changed_before_it_was_read_is_refused(tmp_path, on_read) -> None:
    root = grey_tree(tmp_path / "r")
    later = root / "test" / "b" / "2.png"
    on_read[root / "train" / "a" / "1.png"] = lambda: rewrite(later, 9)
    with pytest.raises(DataError, match=r"test/b/2\.png changed while the collection was"):
        module(root, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("r-*"))  # nothing installed
    assert module(root, tmp_path / "cache").images("test")[-1].max() == 9  # next run: fine


def test_a_file_changed_after_it_was_read_is_the_next_runs_redecode(tmp_path, on_read) -> None:
    """What is stored is the version of each file the key names (checked after reading it),
    so a file edited once it was read is no reason to refuse: the next run's key differs."""
    root = grey_tree(tmp_path / "a")
    first = root / "train" / "a" / "0.png"
    old = np.asarray(Image.open(first))
    on_read[root / "test" / "b" / "2.png"] = lambda: rewrite(first, 7)
    dm = module(root, tmp_path / "cache")
    np.testing.assert_array_equal(dm.images("train")[0], old)
    again = module(root, tmp_path / "cache")
    assert (again.images("train")[0] == 7).all() and sha(again) != sha(dm)
    with open(again._prepare() / "manifest.json") as fh:
        assert json.load(fh)["source"]["key"] != dm._key


def test_unreadable_files_of_every_split_are_listed_together(tmp_path) -> None:
    root = grey_tree(tmp_path / "u")
    (root / "train" / "a" / "bad.png").write_bytes(b"not a picture")
    (root / "test" / "b" / "bad.png").write_bytes(b"not a picture")
    with pytest.raises(DataError, match=r"2 unreadable files: .*train/a/bad\.png, .*test/b/bad"):
        module(root, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("u-*"))


def test_the_key_holds_the_library_versions_importlib_reads() -> None:
    """Read from the METADATA headers (fast); the same strings, so existing keys stay valid."""
    from importlib.metadata import version

    for name in ("pillow", "numpy", "torch", "pydicom", "nibabel"):
        assert cache_module._version(name) == version(name)
    assert cache_module._version("no-such-distribution-for-cbmir") is None


@pytest.mark.parametrize("how", ["renamed over", "rewritten"])
def test_a_picture_changed_once_opened_is_refused(tmp_path, on_read, how) -> None:
    """A picture is read from the file the decoder opened and stamped by `fstat` of that
    file, not of its path: rewritten in place, its mtime and ctime change; a new file renamed
    over the path unlinks the one being read, which changes its ctime. Either way the row is
    refused and nothing is installed; the next run decodes the new content."""
    root = grey_tree(tmp_path / "o")
    path = root / "train" / "a" / "1.png"

    def replace() -> None:
        if how == "rewritten":
            return rewrite(path, 5)
        Image.new("L", (8, 8), 5).save(tmp_path / "new.png")
        (tmp_path / "new.png").replace(path)

    on_read[path] = replace
    with pytest.raises(DataError, match=r"train/a/1\.png changed while the collection was"):
        module(root, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("o-*"))
    again = module(root, tmp_path / "cache")
    row = again.split_files("train").index(str(path))
    assert (again.images("train")[row] == 5).all()


def test_the_decode_stats_each_picture_once(tmp_path, monkeypatch) -> None:
    """One `stat` per file, for the key; what is read is stamped by `fstat` of the open file
    (after a decode, a path lookup costs several times an idle one). It was three."""
    import os

    from cbmir.data.collection import folder_collection
    from cbmir.data.decode import DecodeSettings

    root = grey_tree(tmp_path / "s")
    files = {str(p) for p in root.rglob("*.png")}
    counts: dict[str, int] = {}
    real = os.stat

    def counting(path, *args, **kwargs):
        name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if name in files:
            counts[name] = counts.get(name, 0) + 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting)
    collection = folder_collection(root, tmp_path / "cache", 0, {"train": 0.8, "test": 0.2})
    folder, _ = cache_module.prepare_collection(
        collection, DecodeSettings(), tmp_path / "cache", "s"
    )
    assert counts == dict.fromkeys(files, 1)
    assert (folder / "train_images.npy").is_file()


def test_batches_are_large_yet_every_worker_gets_several() -> None:
    """Per-batch costs are paid once per up to 64 rows (they were once per 16); a small
    collection still gives each worker four batches."""
    assert cache_module._chunk_size(20_000, 2) == 64
    assert cache_module._chunk_size(20_000, 0) == 64
    assert cache_module._chunk_size(79, 2) == 9
    assert cache_module._chunk_size(3, 2) == 1


def test_the_key_text_is_unchanged_for_existing_caches(tmp_path) -> None:
    """Rows are named tuples and their labels stay tuples in the key's record: JSON writes
    them as the lists the key was made of, so an existing cache stays valid."""
    import hashlib

    from cbmir.data.collection import folder_collection
    from cbmir.data.decode import DecodeSettings

    root = grey_tree(tmp_path / "k", n=1)
    collection = folder_collection(root, tmp_path / "cache", 0, {"train": 0.8, "test": 0.2})
    stamps = cache_module.row_stamps(collection)
    record = {
        "cache_format": cache_module.CACHE_FORMAT,
        "decode": DecodeSettings().identity(),
        "on_error": "stop",
        "libraries": cache_module._library_versions(),
        "label_names": ["a", "b"],
        "multilabel": False,
        "rows": [
            [str(r.path), list(r.labels), r.split, s]
            for r, s in zip(collection.rows, stamps, strict=True)
        ],
    }
    text = json.dumps(record, sort_keys=True)
    expected = hashlib.sha256(text.encode()).hexdigest()
    assert cache_module.collection_key(collection, DecodeSettings(), "stop") == expected
    assert [list(s[0]) for s in stamps] == [
        [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        for st in (Path(r.path).stat() for r in collection.rows)
    ]


def _content_digest(dm: CollectionDataModule, row_digest, version: bytes) -> str:
    """`_content_sha256` recomputed from the stored arrays of a grey collection (stored rows
    are the decoded rows there), with `row_digest` per row under the format tag `version`."""
    import hashlib

    digest = hashlib.sha256(b"cbmir collection rows " + version)
    for split in ("train", "test"):
        images, labels = np.asarray(dm.images(split)), np.asarray(dm.labels(split), np.int64)
        digest.update(json.dumps([split, list(images.shape), list(labels.shape)]).encode())
        for image in images:
            head = f"{image.dtype.str}{image.shape}".encode()
            digest.update(row_digest(head + np.ascontiguousarray(image).tobytes()))
        digest.update(np.ascontiguousarray(labels).data)
    return digest.hexdigest()


def test_the_content_digest_of_xxh3_rows_never_equals_a_sha256_rows_digest(tmp_path) -> None:
    """Rows are digested by xxh3_128 (a twentieth of the decode's CPU time went to sha256);
    the content digest's format tag moved from 1 to 2 with it, so a digest of the old format
    (the embeddings' store key of caches decoded before) never equals a new one."""
    import hashlib

    import xxhash

    dm = module(grey_tree(tmp_path / "v"), tmp_path / "cache")
    new = _content_digest(dm, lambda b: xxhash.xxh3_128(b).digest(), b"2")
    assert sha(dm) == new
    assert sha(dm) != _content_digest(dm, lambda b: hashlib.sha256(b).digest(), b"1")


def test_a_file_rewritten_with_the_same_pixels_keeps_the_content_digest(tmp_path) -> None:
    """Its stamp changed, so the collection is decoded again (a new key); the content digest,
    the embeddings' store key, is the same: nothing is embedded again."""
    root = grey_tree(tmp_path / "p")
    first = module(root, tmp_path / "cache")
    path = root / "train" / "b" / "1.png"
    pixels = np.asarray(Image.open(path))
    path.unlink()
    Image.fromarray(pixels).save(path)  # a new file (inode, ctime), the same pixels
    again = module(root, tmp_path / "cache")
    assert again._key != first._key and sha(again) == sha(first)
