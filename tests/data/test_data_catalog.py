import pytest

from cbmir.data import catalog
from cbmir.errors import ConfigError


def test_flag_lists():
    assert len(catalog.FLAGS_2D) == 12
    assert len(catalog.FLAGS_3D) == 6
    assert "breastmnist" in catalog.FLAGS_2D and "adrenalmnist3d" in catalog.FLAGS_3D


def test_sizes_and_names():
    assert catalog.valid_sizes("pathmnist") == (28, 64, 128, 224)
    assert catalog.valid_sizes("organmnist3d") == (28, 64)
    assert catalog.paper_name("breastmnist") == "BreastMNIST"
    assert catalog.paper_name("adrenalmnist3d") == "AdrenalMNIST3D"
    assert catalog.label_names("breastmnist") == {0: "malignant", 1: "normal, benign"}
    assert catalog.is_multilabel("chestmnist") and not catalog.is_multilabel("pathmnist")
    assert catalog.n_samples("breastmnist") == {"train": 546, "val": 78, "test": 156}
    assert catalog.check_flag_size("BreastMNIST", 64) == "breastmnist"


def test_unknown_flag_lists_choices():
    with pytest.raises(ConfigError) as err:
        catalog.check_flag_size("breastmnst", 28)
    msg = str(err.value)
    assert "breastmnst" in msg and "Did you mean 'breastmnist'" in msg
    assert all(f in msg for f in catalog.FLAGS_2D + catalog.FLAGS_3D)


@pytest.mark.parametrize(
    ("flag", "size", "expected"),
    [
        ("organmnist3d", 128, "organmnist3d is a 3D dataset: sizes 28 or 64"),
        ("breastmnist", 32, "breastmnist is a 2D dataset: sizes 28, 64, 128 or 224"),
        ("breastmnist", "28", "not '28'"),
    ],
)
def test_bad_size_lists_valid_sizes(flag, size, expected):
    with pytest.raises(ConfigError, match=expected):
        catalog.check_flag_size(flag, size)
