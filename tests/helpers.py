"""Shared test helpers: compose the real Hydra configs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from cbmir.config import config_dir
from cbmir.runner import compose


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The `cbmir` config as the entry point composes it (resolvers registered)."""
    return compose("config", overrides, return_hydra_config=return_hydra_config)


def config_options(group: str) -> list[str]:
    """Every option of a config group (one yaml file each)."""
    return sorted(
        p.stem for p in (config_dir() / group).glob("*.yaml") if not p.stem.startswith("_")
    )


def cbmir_env(root: Path) -> dict[str, str]:
    """The environment of a test `cbmir` process: offline, every path under `root` (data/,
    synthetic/, store/, logs/)."""
    return {
        **os.environ,
        "MEDMNIST_ROOT": str(root / "data"),
        "CBMIR_SYNTHETIC_ROOT": str(root / "synthetic"),
        "CBMIR_STORE": str(root / "store"),
        "CBMIR_LOG_DIR": str(root / "logs"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }


def cbmir_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "cbmir.cli", *args]


def run_cbmir(
    args: Sequence[str], root: Path, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    """The real `cbmir` in a subprocess (`cbmir_env`: offline, every path under `root`)."""
    proc = subprocess.run(
        cbmir_command(args),
        env=cbmir_env(root),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=root,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cbmir failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cbmir_in(
    args: Sequence[str], dirs: dict[str, Path], check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    """`run_cbmir` under the folders of the `dirs` fixture (tests/conftest.py)."""
    return run_cbmir(args, dirs["logs"].parent, check=check, timeout=timeout)
