"""Shared test helpers: compose the real Hydra configs."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from cbmir.config import config_dir


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def config_options(group: str) -> list[str]:
    """Every option of a config group (one yaml file each)."""
    return sorted(
        p.stem for p in (config_dir() / group).glob("*.yaml") if not p.stem.startswith("_")
    )
