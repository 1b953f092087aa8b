"""Shared fixtures. Data fixtures are session-scoped: files are written once per test run and
must be treated as read-only (copy a file before modifying it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

#: the files that take longest (each ~25 s or more of one worker's time, measured on the 2-core
#: CI machine), heaviest first. Run first: `--dist loadfile` hands out whole files, and xdist's
#: default order (most tests first) left these few-test files for the end, where one of them
#: could run alone while the other worker idled (pyproject's addopts: --no-loadscope-reorder).
HEAVY_FILES = (
    "cli/test_pipeline_e2e.py",
    "cli/test_pipeline_e2e_inputs.py",
    "sweeps/test_shared_sweep_dir.py",
    "test_validation.py",
    "extractors/test_pretrained_cache.py",
    "extractors/test_foundation_extractors.py",
    "finetune/test_finetune_cli.py",
    "volumes/test_volumes_cli.py",
    "extractors/test_checkpoint.py",
    "test_distributed.py",
    "cli/test_crash_recovery.py",
    "retrieval/test_text_queries.py",
    "extractors/test_pretrained_reference.py",
    "extractors/test_random_init.py",
    "query/test_query_cli.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the tests of `HEAVY_FILES` first, in that order; the rest keep theirs."""
    tests = Path(__file__).parent
    missing = [name for name in HEAVY_FILES if not (tests / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py HEAVY_FILES lists missing files: {missing}")
    rank = {tests / name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))


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


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """The folders a test `cbmir` process works in (`helpers.cbmir_env`: data, synthetic,
    store, logs under one root), created empty."""
    out = {name: tmp_path / name for name in ("data", "synthetic", "store", "logs")}
    for path in out.values():
        path.mkdir()
    return out
