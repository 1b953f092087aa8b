"""Shared fixtures. Data fixtures are session-scoped: files are written once per test run and
must be treated as read-only (copy a file before modifying it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def make_synthetic(tmp_path_factory) -> Callable[..., Path]:
    """Factory `make_synthetic(flag, size=28) -> npz path`, one shared root, each file once."""
    from cbmir.data.synthetic import write_synthetic_medmnist

    root = tmp_path_factory.mktemp("medmnist")
    written: dict[tuple[str, int], Path] = {}

    def make(flag: str, size: int = 28) -> Path:
        if (flag, size) not in written:
            written[(flag, size)] = write_synthetic_medmnist(root, flag, size, seed=0)
        return written[(flag, size)]

    return make


@pytest.fixture(scope="session")
def synthetic_root(make_synthetic) -> Path:
    """A medmnist root folder holding a synthetic breastmnist.npz (28 px)."""
    return make_synthetic("breastmnist", 28).parent


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    """scikit-learn's real digits (10 classes) as a 28 px MedMNIST-layout npz."""
    from cbmir.data.synthetic import write_digits_npz

    return write_digits_npz(tmp_path_factory.mktemp("digits") / "digits.npz", size=28)
