"""The sweep's summary on W&B: one ``report`` run in the sweep's group, holding a table of every
job's metrics (with intervals and timings), the comparison with the paper, and the figures.

Each job already logs its own run (config + metrics) through Lightning's WandbLogger, named
model-dataset-size and grouped by the sweep directory's name; this run joins that group, so
the dashboard shows the jobs and their summary together. It is made after the jobs, from
their files, so it also covers re-launched and cluster sweeps, and can be redone any time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from cbmir.report.build import Report

log = logging.getLogger(__name__)


def _from_jobs(jobs: pd.DataFrame, sweep_dir: Path, key: str) -> str | None:
    """A W&B setting (project, group) as the sweep's own jobs used it."""
    from omegaconf import OmegaConf

    for job in jobs["job"]:
        path = sweep_dir / job / "config_resolved.yaml"
        if path.is_file():
            value = OmegaConf.select(OmegaConf.load(path), f"logger.wandb.{key}", default=None)
            if value:
                return str(value)
    return None


def _table(df: pd.DataFrame) -> Any:
    import wandb

    clean = df.copy()
    for column in clean.columns:
        if clean[column].dtype == object:
            clean[column] = clean[column].fillna("").astype(str)
    return wandb.Table(dataframe=clean.reset_index(drop=True))


def log_summary(report: Report, project: str | None = None, entity: str | None = None) -> Path:
    """Log the report as one W&B run; returns the run's local directory.

    Offline (``WANDB_MODE=offline``) the run is written under ``<report>/wandb/`` for a later
    ``wandb sync``.
    """
    import wandb

    group = _from_jobs(report.jobs, report.sweep_dir, "group") or report.sweep_dir.name
    project = project or _from_jobs(report.jobs, report.sweep_dir, "project") or "cbmir"
    report.out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        entity=entity,
        group=group,
        job_type="report",
        name=f"report-{group}",
        dir=str(report.out_dir),
        config={"sweep_dir": str(report.sweep_dir), "n_jobs": len(report.jobs)},
        reinit="finish_previous",
    )
    try:
        payload: dict[str, Any] = {"sweep/jobs": _table(report.jobs)}
        if report.comparison is not None:
            payload["sweep/comparison"] = _table(report.comparison)
        if report.significance is not None and not report.significance.pairs.empty:
            payload["sweep/significance"] = _table(report.significance.pairs)
        for path in report.figures:
            payload[f"figures/{path.stem}"] = wandb.Image(str(path))
        run.log(payload)
        counts = report.jobs["status"].value_counts()
        for status in ("finished", "failed", "incomplete"):
            run.summary[f"jobs_{status}"] = int(counts.get(status, 0))
        local = Path(run.dir).parent
    finally:
        run.finish()
    log.info("W&B: summary run report-%s in project %s (group %s)", group, project, group)
    return local


def flush() -> None:
    """Shut W&B's service down so everything is on disk (offline) or sent now: `finish()`
    alone may leave an offline run's file unwritten until the process exits. For the process
    that owns W&B (the CLI, the sweep's launcher at its end), not for library callers."""
    import wandb

    wandb.teardown()
