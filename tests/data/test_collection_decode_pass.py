"""One pass over the files on the first run: sizes, colour and 2D/3D are learned while decoding
(no header pass); mixed sizes and kinds still stop with the full message before any embedding,
and a colour file found late turns what was stored before it into RGB, as if known upfront."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from cbmir.data import CollectionDataModule
from cbmir.data import collection_cache as cache_module
from cbmir.data.decode import read_item
from cbmir.errors import DataError


def module(path: Path, tmp_path: Path, **kwargs) -> CollectionDataModule:
    dm = CollectionDataModule(path, cache_dir=tmp_path / "cache", **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def grey_tree(root: Path, side: int = 8) -> dict[str, np.ndarray]:
    """root/<split>/<a|b>/<i>.png, grey; {relative path: pixels}."""
    written = {}
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                pixels = rng.integers(0, 255, (side, side), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
                written[f"{split}/{cls}/{i}.png"] = pixels
    return written


@pytest.fixture
def header_reads(monkeypatch) -> list[Path]:
    """The files whose header the cache module reads (it needs none on a good collection)."""
    seen: list[Path] = []
    real = cache_module.read_header

    def spy(path: Path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(cache_module, "read_header", spy)
    return seen


def test_a_good_collection_is_decoded_without_a_header_pass(tmp_path, header_reads) -> None:
    written = grey_tree(tmp_path / "g")
    dm = module(tmp_path / "g", tmp_path)
    assert header_reads == []
    assert dm.image_shape == (1, 8, 8)
    for split in ("train", "test"):
        files = dm.split_files(split)
        expected = [written[str(Path(f).relative_to(tmp_path / "g"))] for f in files]
        np.testing.assert_array_equal(dm.images(split), np.stack(expected))


def test_a_late_colour_file_makes_every_split_rgb(tmp_path, header_reads) -> None:
    written = grey_tree(tmp_path / "c")
    colour = np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "c" / "test" / "b" / "9.png")  # last file of all
    dm = module(tmp_path / "c", tmp_path)
    assert dm.image_shape == (3, 8, 8) and header_reads == []
    train = dm.images("train")
    first = written[str(Path(dm.split_files("train")[0]).relative_to(tmp_path / "c"))]
    np.testing.assert_array_equal(train[0], np.repeat(first[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(dm.images("test")[-1], colour)
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_mixed_sizes_found_late_stop_with_every_size_and_nothing_installed(tmp_path) -> None:
    grey_tree(tmp_path / "m")
    Image.new("L", (12, 10), 3).save(tmp_path / "m" / "test" / "b" / "7.png")
    Image.new("L", (5, 5), 3).save(tmp_path / "m" / "test" / "a" / "7.png")
    with pytest.raises(DataError, match=r"3 different sizes .*10 x 12.*set data\.size=N"):
        module(tmp_path / "m", tmp_path)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("m-")]
    assert module(tmp_path / "m", tmp_path, size=8).images("test").shape == (6, 8, 8)


def test_images_and_volumes_mixed_stop_naming_the_volumes(tmp_path) -> None:
    grey_tree(tmp_path / "v")
    nib.save(
        nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)),
        tmp_path / "v" / "test" / "a" / "vol.nii.gz",
    )
    with pytest.raises(DataError, match=r"mixes 2D images and volumes \(1 volumes: .*vol\.nii"):
        module(tmp_path / "v", tmp_path, size=8)


def test_decoding_checks_what_the_header_pass_checked(tmp_path) -> None:
    pages = [Image.new("L", (8, 8), v) for v in (1, 2)]
    pages[0].save(tmp_path / "p.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match=r"multi-frame picture \(2 frames\)"):
        read_item(tmp_path / "p.tif", None)
    (tmp_path / "x.png").write_bytes(b"not a picture")
    with pytest.raises(DataError, match=r"x\.png: not a picture Pillow can read"):
        read_item(tmp_path / "x.png", None)


def test_listing_keeps_the_sorted_path_order_and_inputs(tmp_path) -> None:
    """Rows are stored in sorted-Path order (the cache key and row ids depend on it), also for
    names where plain string order differs ('a-b' < 'a/x' as text, not as paths)."""
    from cbmir.data.collection import folder_collection

    root = tmp_path / "o"
    for split in ("train", "test"):
        for cls in ("a", "a-b", "a.b", "B", "a b"):
            (root / split / cls).mkdir(parents=True)
            for name in ("1.png", "10.png", "1-1.png", "é.png", "_.png"):
                Image.new("L", (4, 4), 1).save(root / split / cls / name)
    (root / "train" / "empty").mkdir()
    collection = folder_collection(root, tmp_path / "cache", 0, {"train": 0.8, "test": 0.2})
    paths = [r.path for r in collection.rows]
    assert paths == sorted(paths) and len(paths) == 50
    assert [str(p) for p in paths] != sorted(str(p) for p in paths)  # the case is a real one
    parents = {p.parent for p in paths}
    expected = sorted({root.resolve(), *(root.resolve() / s for s in ("train", "test")), *parents})
    assert collection.inputs == expected  # an empty class folder is no input
