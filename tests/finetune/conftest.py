"""Fixtures for fine-tuning tests: a tiny labelled npz (train/val/test) and composed
`finetune` configs with a tiny real timm backbone (random weights)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from cbmir.runner import compose

#: the smallest real timm CNN (a 4-stage ResNet, 0.37 M parameters), random weights
TINY_MODEL = [
    "model=timm",
    "model.model_name=test_resnet",
    "model.pretrained=false",
    "model.input_size=null",
]
SPLIT_SIZES = {"train": 96, "val": 32, "test": 40}
N_CLASSES = 4


def write_tiny_npz(path: Path, seed: int = 0) -> Path:
    """4 classes: a bright 10 px square in the class's quadrant on noise, 28 x 28 grey."""
    rng = np.random.default_rng(seed)
    members = {}
    for split, n in SPLIT_SIZES.items():
        labels = np.arange(n) % N_CLASSES
        images = rng.integers(0, 90, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 2)
            images[i, 2 + 14 * r : 12 + 14 * r, 2 + 14 * q : 12 + 14 * q] += 150
        members[f"{split}_images"] = images
        members[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
    np.savez(path, **members)
    return path


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    return write_tiny_npz(tmp_path_factory.mktemp("tiny") / "tiny.npz")


def compose_finetune(overrides: Sequence[str] = ()) -> DictConfig:
    return compose("finetune", overrides)


@pytest.fixture
def finetune_cfg(tiny_npz, tmp_path) -> Callable[..., DictConfig]:
    """`finetune_cfg(*overrides, out="run")`: a small, fast fine-tune of the tiny backbone."""

    def make(*overrides: str, out: str = "run") -> DictConfig:
        return compose_finetune(
            [
                "data=npz",
                f"data.path={tiny_npz}",
                "data.batch_size=64",
                *TINY_MODEL,
                f"paths.output_dir={tmp_path / out}",
                "logger=csv",
                "trainer.enable_progress_bar=false",
                "finetune.batch_size=16",
                "finetune.max_epochs=2",
                "finetune.limit_train_batches=3",
                "finetune.lr=1e-3",
                *overrides,
            ]
        )

    return make
