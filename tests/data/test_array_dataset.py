import os
import pickle

import numpy as np
import pytest
import torch

from cbmir.data.datasets import ArraySplitDataset
from cbmir.errors import DataError


@pytest.mark.parametrize(
    ("shape", "volume", "item"),
    [
        ((5, 8, 8), None, (1, 8, 8)),
        ((5, 8, 6, 3), None, (3, 8, 6)),
        ((5, 4, 8, 8), None, (4, 8, 8)),
        ((5, 4, 8, 3), True, (4, 8, 3)),
    ],
)
def test_items(shape, volume, item):
    images = np.arange(np.prod(shape), dtype=np.uint64).reshape(shape).astype(np.uint8)
    labels = np.arange(5)[:, None]
    ds = ArraySplitDataset(images, labels, volume=volume)
    out = ds[2]
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == item
    assert ds.item_shape == item
    assert out["label"].dtype == torch.int64 and out["label"].tolist() == [2]
    assert out["index"] == 2
    if len(shape) == 4 and not volume and shape[-1] == 3:  # HWC -> CHW keeps pixels
        assert torch.equal(out["image"], torch.from_numpy(images[2]).permute(2, 0, 1))


def test_pickle_reopens_memmap(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 255, (20, 8, 8, 3), np.uint8))
    images = np.load(tmp_path / "x.npy", mmap_mode="r")
    ds = ArraySplitDataset(images, np.zeros((20, 2), np.int64))
    blob = pickle.dumps(ds)
    assert len(blob) < images.nbytes  # the pixels were not copied into the pickle
    ds2 = pickle.loads(blob)
    assert isinstance(ds2.images, np.memmap)
    assert torch.equal(ds2[7]["image"], ds[7]["image"])


def test_pickle_refuses_a_memmap_file_replaced_meanwhile(tmp_path):
    # a spawned worker re-opens by name: a concurrent re-conversion must not swap the pixels
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 255, (20, 8, 8), np.uint8))
    ds = ArraySplitDataset(np.load(tmp_path / "x.npy", mmap_mode="r"), np.zeros((20, 1)))
    np.save(tmp_path / "y.npy", rng.integers(0, 255, (20, 8, 8), np.uint8))
    os.replace(tmp_path / "y.npy", tmp_path / "x.npy")  # as an installed conversion does
    with pytest.raises(DataError, match="was replaced while this run was using it"):
        pickle.loads(pickle.dumps(ds))


def test_mismatched_lengths():
    with pytest.raises(DataError, match="3 images but 2 labels"):
        ArraySplitDataset(np.zeros((3, 4, 4), np.uint8), np.zeros((2, 1)))
