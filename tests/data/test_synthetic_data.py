import medmnist
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from cbmir.data import catalog
from cbmir.data.synthetic import main, synthetic_images, synthetic_labels


@pytest.mark.parametrize(
    ("flag", "item_shape"),
    [("breastmnist", (28, 28)), ("retinamnist", (28, 28, 3)), ("organmnist3d", (28, 28, 28))],
)
def test_loadable_by_real_medmnist_class(make_synthetic, flag, item_shape):
    path = make_synthetic(flag, 28)
    cls = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    for split, n in catalog.n_samples(flag).items():
        ds = cls(split=split, root=str(path.parent), size=28)
        assert len(ds) == n  # medmnist asserts this against INFO
        assert ds.imgs.shape == (n, *item_shape) and ds.imgs.dtype == np.uint8
        assert ds.labels.shape == (n, 1)
        ds[0]  # the class's own __getitem__ works (PIL for 2D, array for 3D)


def test_images_are_informative_but_not_trivial(make_synthetic):
    data = np.load(make_synthetic("breastmnist", 28))
    flat = {s: data[f"{s}_images"].reshape(len(data[f"{s}_images"]), -1) for s in ("train", "test")}
    knn = KNeighborsClassifier(5).fit(flat["train"], data["train_labels"][:, 0])
    acc = knn.score(flat["test"], data["test_labels"][:, 0])
    chance = np.bincount(data["test_labels"][:, 0]).max() / len(data["test_labels"])
    assert chance + 0.15 < acc < 0.99


def test_multilabel_shape_for_chestmnist():
    labels = synthetic_labels("chestmnist", 50, np.random.default_rng(0))
    assert labels.shape == (50, 14) and set(np.unique(labels)) <= {0, 1}
    images = np.concatenate(list(synthetic_images("chestmnist", 28, labels)))
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8


def test_same_seed_same_file(tmp_path):
    from cbmir.data.synthetic import write_synthetic_medmnist

    a = np.load(write_synthetic_medmnist(tmp_path / "a", "breastmnist", 28, seed=3))
    b = np.load(write_synthetic_medmnist(tmp_path / "b", "breastmnist", 28, seed=3))
    assert np.array_equal(a["test_images"], b["test_images"])
    assert not list((tmp_path / "a").glob("*.tmp"))  # atomic write left no temp file


def test_digits(digits_npz):
    data = np.load(digits_npz)
    n = {s: len(data[f"{s}_images"]) for s in ("train", "val", "test")}
    assert sum(n.values()) == 1797 and n["train"] > n["val"] > 0 and n["test"] > 0
    assert data["train_images"].shape[1:] == (28, 28) and data["train_images"].dtype == np.uint8
    for split in n:
        assert len(np.unique(data[f"{split}_labels"])) == 10


def test_cli(tmp_path, capsys):
    rc = main(["--flags", "breastmnist", "--sizes", "28,64", "--root", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "breastmnist.npz").is_file() and (tmp_path / "breastmnist_64.npz").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(["--flags", "organmnist3d", "--sizes", "128", "--root", str(tmp_path)]) == 2
    assert "sizes 28 or 64" in capsys.readouterr().err
    assert main(["--digits", str(tmp_path / "d.npz"), "--digits-size", "16"]) == 0
    assert np.load(tmp_path / "d.npz")["test_images"].shape[1:] == (16, 16)
