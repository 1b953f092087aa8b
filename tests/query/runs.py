"""Finished benchmark runs for the query and figures tests: the real pipeline, in-process.

`run_benchmark` composes the real config (synthetic data, random weights) and calls
`cbmir.pipeline.run_retrieval`, so the run directory and store entries are exactly what a user's
`cbmir` run leaves behind.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import compose_config

BASE = ["model=pixels", "logger=csv", "trainer.enable_progress_bar=false"]


def dir_overrides(root: Path) -> list[str]:
    """Paths of one test root: synthetic data, store and logs live under it."""
    return [
        f"paths.synthetic_root={root / 'synthetic'}",
        f"paths.data_root={root / 'data'}",
        f"paths.store={root / 'store'}",
        f"paths.log_dir={root / 'logs'}",
    ]


def run_benchmark(root: Path, name: str, *overrides: str, offline: bool = True) -> Path:
    """Run one job into `root/runs/name`; returns its output directory.

    `offline`: experiment=offline (synthetic MedMNIST data); off for `data=npz` runs.
    """
    from cbmir.pipeline import run_retrieval

    out = root / "runs" / name
    base = ["experiment=offline", *BASE] if offline else BASE
    cfg = compose_config([*base, *dir_overrides(root), f"paths.output_dir={out}", *overrides])
    run_retrieval(cfg)
    return out
