import logging
import os
import shutil

import numpy as np
import pytest
import torch

from cbmir.data import MedMNISTDataModule, NpzDataModule
from cbmir.errors import ConfigError, DataError


def copy_root(make_synthetic, tmp_path, flag, size=28):
    """A private root holding a copy of a session synthetic file (safe to modify)."""
    shutil.copy2(make_synthetic(flag, size), tmp_path)
    return tmp_path


def test_breastmnist_synthetic(synthetic_root, tmp_path):
    dm = MedMNISTDataModule("breastmnist", root=synthetic_root, synthetic=True, download=False)
    dm.prepare_data()
    dm.setup()
    assert dm.name == "breastmnist" and dm.size == 28 and not dm.is_volume and not dm.multilabel
    assert dm.image_shape == (1, 28, 28) and dm.label_names == {0: "malignant", 1: "normal, benign"}
    assert dm.images("test").shape == (156, 28, 28) and isinstance(dm.images("test"), np.memmap)
    assert dm.labels("train").shape == (546, 1) and dm.labels("train").dtype == np.int64
    batch = next(iter(dm.dataloader("test", batch_size=8)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 1, 28, 28)
    assert batch["label"].shape == (8, 1) and batch["index"].tolist() == list(range(8))


@pytest.mark.parametrize(
    ("flag", "shape"), [("retinamnist", (3, 28, 28)), ("organmnist3d", (28, 28, 28))]
)
def test_rgb_and_volume_items(make_synthetic, flag, shape):
    root = make_synthetic(flag).parent
    dm = MedMNISTDataModule(flag, root=root, synthetic=True)
    item = dm.dataset("test")[0]
    assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == shape
    assert dm.image_shape == shape and dm.is_volume == (flag == "organmnist3d")


def test_predict_dataloader_order(synthetic_root):
    dm = MedMNISTDataModule("breastmnist", root=synthetic_root, synthetic=True, batch_size=1000)
    assert dm.predict_splits == ["test", "train"]
    query, database = dm.predict_dataloader()
    assert len(next(iter(query))["index"]) == 156 and len(next(iter(database))["index"]) == 546
    dm.predict_splits = ["val"]
    assert len(next(iter(dm.predict_dataloader()))["index"]) == 78
    with pytest.raises(ConfigError):
        dm.predict_splits = ["validation"]


def test_init_validates_cheaply(tmp_path):
    with pytest.raises(ConfigError, match="sizes 28 or 64"):
        MedMNISTDataModule("organmnist3d", size=128, root=tmp_path)
    with pytest.raises(ConfigError, match="Valid flags"):
        MedMNISTDataModule("nosuchmnist", root=tmp_path)
    with pytest.raises(ConfigError, match="query_split"):
        MedMNISTDataModule("breastmnist", root=tmp_path, query_split="testing")
    assert list(tmp_path.iterdir()) == []


def test_missing_file_without_download(tmp_path):
    dm = MedMNISTDataModule("pneumoniamnist", size=64, root=tmp_path / "nowhere", download=False)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "pneumoniamnist_64.npz") in msg
    assert "download=true" in msg and "zenodo.org" in msg and "cbmir-synth" in msg


def test_synthetic_writes_missing_file_without_network(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv

    monkeypatch.setattr(tv, "download_url", lambda **kw: pytest.fail("network used"))
    dm = MedMNISTDataModule("breastmnist", root=tmp_path / "new", synthetic=True, download=True)
    dm.setup()
    assert (tmp_path / "new" / "breastmnist.npz").is_file() and dm.is_synthetic


def test_synthetic_file_is_flagged_when_not_asked_for(synthetic_root, caplog):
    # a synthetic file under the real name fails the published MD5 (it used to pass with a
    # warning); with verify=False it is used, and flagged as synthetic and unverified
    with pytest.raises(DataError, match="synthetic stand-in written by cbmir-synth"):
        MedMNISTDataModule("breastmnist", root=synthetic_root, download=False).setup()
    dm = MedMNISTDataModule("breastmnist", root=synthetic_root, download=False, verify=False)
    with caplog.at_level(logging.WARNING, logger="cbmir.data.datamodule"):
        dm.setup()
    assert "SYNTHETIC" in caplog.text and dm.identity("test")["synthetic"] is True
    assert dm.data_facts()["synthetic"] is True and dm.data_facts()["data_verified"] is False


def test_identity_follows_content(make_synthetic, tmp_path):
    from cbmir.data.synthetic import write_synthetic_medmnist

    root = copy_root(make_synthetic, tmp_path, "breastmnist")
    dm = MedMNISTDataModule("breastmnist", root=root, synthetic=True)
    first = dm.identity("test")
    assert first["name"] == "breastmnist" and first["size"] == 28 and first["split"] == "test"
    assert len(first["source_sha256"]) == 64
    assert dm.identity("train") != first
    same = MedMNISTDataModule(
        "breastmnist", root=make_synthetic("breastmnist").parent, synthetic=True
    )
    assert same.identity("test") == first  # same content elsewhere: same identity
    write_synthetic_medmnist(root, "breastmnist", 28, seed=1)
    st = (root / "breastmnist.npz").stat()
    os.utime(root / "breastmnist.npz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = MedMNISTDataModule("breastmnist", root=root, synthetic=True)
    assert fresh.identity("test")["source_sha256"] != first["source_sha256"]


def _save(path, images, labels, splits=("train", "val", "test")):
    arrays = {}
    for i, split in enumerate(splits):
        arrays[f"{split}_images"] = images[i::3]
        arrays[f"{split}_labels"] = labels[i::3]
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("item", "volumes", "shape", "is_volume"),
    [
        ((10, 12), None, (1, 10, 12), False),
        ((10, 12, 3), None, (3, 10, 12), False),
        ((6, 10, 10), None, (6, 10, 10), True),
        ((6, 10, 3), True, (6, 10, 3), True),
    ],
)
def test_npz_datamodule_layouts(tmp_path, item, volumes, shape, is_volume):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, *item), dtype=np.uint8)
    path = _save(tmp_path / "mine.npz", images, rng.integers(0, 4, (30, 1)))
    dm = NpzDataModule(path, volumes=volumes, batch_size=4)
    batch = next(iter(dm.predict_dataloader()[0]))
    assert batch["image"].shape == (4, *shape) and batch["image"].dtype == torch.uint8
    assert dm.image_shape == shape and dm.is_volume == is_volume and dm.name == "mine"
    assert dm.size == max(shape[-2:])
    NpzDataModule(path, volumes=volumes, size=max(shape[-2:])).setup()
    with pytest.raises(ConfigError, match="data.size=999"):
        NpzDataModule(path, volumes=volumes, size=999).setup()


def test_npz_datamodule_multilabel_without_val(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 2, (30, 5))
    dm = NpzDataModule(_save(tmp_path / "ml.npz", images, labels, splits=("train", "test")))
    assert dm.multilabel and dm.label_names == {i: str(i) for i in range(5)}
    assert dm.splits == ("train", "test") and dm.labels("test").shape == (10, 5)
    with pytest.raises(DataError, match="no val split"):
        dm.val_dataloader()
    with pytest.raises(DataError, match="no val split"):
        NpzDataModule(tmp_path / "ml.npz", query_split="val").setup()


def test_npz_datamodule_missing_file(tmp_path):
    with pytest.raises(DataError, match="Expected your npz at .*absent.npz"):
        NpzDataModule(tmp_path / "absent.npz").setup()


def test_digits_datamodule(digits_npz):
    dm = NpzDataModule(digits_npz, label_names=[str(d) for d in range(10)])
    assert dm.num_classes == 10 and not dm.multilabel and dm.image_shape == (1, 28, 28)
    assert np.unique(dm.labels("train")).tolist() == list(range(10))
    assert len(next(iter(dm.train_dataloader()))["image"]) == 256


def test_worker_processes(synthetic_root):
    dm = MedMNISTDataModule("breastmnist", root=synthetic_root, synthetic=True, num_workers=1)
    assert dm.train_dataloader().persistent_workers
    loader = dm.dataloader("test", batch_size=64)
    assert not loader.persistent_workers
    batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == 156
    assert torch.equal(batches[0]["image"][0, 0], torch.from_numpy(np.array(dm.images("test")[0])))
