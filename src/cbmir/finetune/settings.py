"""The `finetune` settings of `cbmir-finetune` and their rules, with no torch or Lightning
import: the entry point checks them before the fine-tuning stack loads (some seconds), so a
bad setting fails in about one. The modules that use a setting re-export its names
(`losses.OBJECTIVES`, `strategy.STRATEGIES`, `run.FinetuneSchema`, `augment.AffineAugment`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from cbmir.config import check_choice, check_int
from cbmir.errors import ConfigError
from cbmir.schema import typed

OBJECTIVES = ("supcon", "triplet", "classification")
#: objectives trained on L2-normalised embeddings (`finetune.normalize=null` follows them)
METRIC_OBJECTIVES = ("supcon", "triplet")
STRATEGIES = ("full", "last_block", "projection_head")


@dataclass(frozen=True)
class AugmentSettings:
    """Rotation (degrees), translation (fraction of the side), scale range, optional h-flip;
    `augment.AffineAugment` applies them."""

    rotate: float = 10.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    hflip: bool = False

    def __post_init__(self) -> None:
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(
                f"finetune.augment.scale must be [min, max], 0 < min <= max; got {list(self.scale)}"
            )


@dataclass
class FinetuneSchema:
    """The `finetune` keys of configs/finetune.yaml and their types (`typed` checks them first)."""

    objective: str = "supcon"
    strategy: str = "full"
    name: str = ""
    projection_dim: int | None = None
    projection_hidden: int | None = None
    projection_input_norm: bool = True
    normalize: bool | None = None
    max_epochs: int = 20
    batch_size: int = 128
    lr: float = 1.0e-4
    head_lr: float | None = 1.0e-3
    weight_decay: float = 1.0e-4
    warmup_epochs: float = 1.0
    temperature: float = 0.1
    margin: float = 0.2
    mining: str = "semihard"
    augment: AugmentSettings | None = field(default_factory=AugmentSettings)
    limit_train_batches: Any = 1.0  # a fraction (float) or a count (int)
    log_every_n_steps: int = 10
    validate_start: bool = True
    resume: Any = None  # true, or a path to last.ckpt / its folder (`run.resolve_resume`)

    def __post_init__(self) -> None:
        check_choice(self.objective, OBJECTIVES, "finetune.objective")
        check_choice(self.strategy, STRATEGIES, "finetune.strategy")
        check_int(self.max_epochs, "finetune.max_epochs")
        for key in ("lr", "weight_decay", "warmup_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"finetune.{key} must be >= 0, not {getattr(self, key)!r}")
        if self.projection_dim is not None:
            check_int(self.projection_dim, "finetune.projection_dim (or null)")


def finetune_settings(cfg: DictConfig) -> FinetuneSchema:
    """`cfg.finetune` checked against `FinetuneSchema` (a `ConfigError` naming the key)."""
    return typed(FinetuneSchema, cfg.finetune, "finetune")
