"""Gather every job of a sweep directory into one table (one row per job, failed ones too).

A job directory is any directory holding `config_resolved.yaml`, `metrics.json` or
`error.json` (the files `cbmir` writes); it is finished when its commit record `job.json`
vouches for its files, as for resume (`cbmir.resume.committed`). Metrics become percentages, as in the paper; each gets
its 95% bootstrap interval from `metrics.json` (``ci95``; empty where the job had too few
queries, e.g. a two-class text run) or, for older jobs without the key, recomputed from
`per_query.npz`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cbmir.errors import CbmirError
from cbmir.report.names import (
    METRICS,
    dataset_order,
    dataset_paper_name,
    is_metric_key,
    metric_column,
    model_order,
    model_paper_name,
)
from cbmir.resume import RECORD, committed
from cbmir.retrieval.bootstrap import bootstrap_cis
from cbmir.sweeps import extra_overrides

log = logging.getLogger(__name__)

#: what reading a job's (possibly truncated or hand-edited) YAML file can raise
UNREADABLE_YAML = (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException)

JOB_FILES = ("config_resolved.yaml", "metrics.json", "error.json")
STATUSES = ("finished", "failed", "incomplete")


def find_job_dirs(sweep_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Every job directory under `sweep_dir` (not under `exclude`, the report's own folder)."""
    found = {path.parent for name in JOB_FILES for path in sweep_dir.rglob(name)}
    return sorted(job for job in found if exclude is None or not job.is_relative_to(exclude))


def load_job_config(job: Path) -> DictConfig | None:
    """A job's config as it ran (resolved, else Hydra's own copy); None when unreadable."""
    for rel in ("config_resolved.yaml", ".hydra/config.yaml"):
        path = job / rel
        if path.is_file():
            try:
                loaded = OmegaConf.load(path)
                return loaded if isinstance(loaded, DictConfig) else None
            except UNREADABLE_YAML as exc:  # a corrupt file is reported, not fatal
                log.warning("cannot read %s: %s", path, exc)
    return None


def config_value(cfg: DictConfig | None, key: str, default: Any = None) -> Any:
    """`key` of a job's config, or `default` where it is absent, null or does not resolve."""
    if cfg is None:
        return default
    try:
        value = OmegaConf.select(cfg, key, default=default)
    except OmegaConfBaseException:  # unresolvable interpolation in an unresolved .hydra/config.yaml
        return default
    return default if value is None else value


def _setting(job: Path) -> str:
    """The job's result-changing overrides beyond model/data/size ("" for a plain job)."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(path))
    except UNREADABLE_YAML:
        return ""
    return ",".join(extra_overrides(str(o) for o in overrides or []))


def _with_query(setting: str, cfg: DictConfig | None) -> str:
    """Text-query jobs (`retrieval.query=text`) are a setting of their own: "text" leads it, so
    their rows sit beside the image rows ("BiomedCLIP (text)") and never replace them."""
    if config_value(cfg, "retrieval.query", "image") != "text":
        return setting
    return ",".join(part for part in ("text", setting) if part)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _status(job: Path) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """(status, metrics, error) of a job directory: finished exactly when resume would skip
    it (a commit record naming the digests of its files, `cbmir.resume.committed`); failed
    when it left an error newer than any such record; incomplete otherwise (killed, or files
    that no record vouches for)."""
    error_path = job / "error.json"
    error = _read_json(error_path) if error_path.is_file() else None
    done = committed(job)
    if error is not None and (
        done is None or error_path.stat().st_mtime >= (job / RECORD).stat().st_mtime
    ):
        return "failed", None, error
    if done is not None:
        return "finished", done[1], None
    return "incomplete", None, None


def _intervals(job: Path, metrics: dict[str, Any]) -> dict[str, tuple[float, float]]:
    stored = metrics.get("ci95")
    if isinstance(stored, dict):  # empty: too few queries for an interval (text runs)
        return {k: (float(v[0]), float(v[1])) for k, v in stored.items()}
    path = job / "per_query.npz"
    if not path.is_file():
        return {}
    with np.load(path) as per_query:
        return bootstrap_cis({k: per_query[k] for k in per_query.files})


def job_row(job: Path, sweep_dir: Path) -> dict[str, Any]:
    """One job as a flat dict: names, size, status, metrics in % with intervals, timings."""
    cfg = load_job_config(job)
    status, metrics, error = _status(job)
    model = str(config_value(cfg, "model.name", "?"))
    dataset = str(config_value(cfg, "data.flag", config_value(cfg, "data.name", "?")))
    size = config_value(cfg, "data.size")
    row: dict[str, Any] = {
        "job": str(job.relative_to(sweep_dir)) if job != sweep_dir else ".",
        "run_name": config_value(cfg, "run_name", job.name),
        "model": model,
        "model_paper": model_paper_name(model),
        "dataset": dataset,
        "dataset_paper": dataset_paper_name(dataset),
        "size": int(size) if isinstance(size, int) or str(size).isdigit() else None,
        "setting": _with_query(_setting(job), cfg),
        "synthetic": bool(config_value(cfg, "data.synthetic", False)),
        "pretrained": bool(config_value(cfg, "model.pretrained", True)),
        "data_verified": None,
        "status": status,
        "error": "" if error is None else f"{error.get('type', 'Error')}: {error.get('error', '')}",
        "committed_at": (job / RECORD).stat().st_mtime if status == "finished" else None,
    }
    if metrics is not None:
        cis = _intervals(job, metrics)
        for key, value in metrics.items():
            if is_metric_key(key) and isinstance(value, (int, float)):
                col = metric_column(key)
                row[col] = 100.0 * float(value)
                if key in cis:
                    row[f"{col}_low"] = 100.0 * cis[key][0]
                    row[f"{col}_high"] = 100.0 * cis[key][1]
        for key in ("zero_shot_acc", "zero_shot_balanced_acc"):  # text queries (docs/text.md)
            if isinstance(metrics.get(key), int | float):
                row[key] = 100.0 * float(metrics[key])
        for key in ("n_queries", "n_database", "k", "distance", "embed_seconds", "search_seconds"):
            row[key] = metrics.get(key)
        row["embedded_now"] = ",".join(metrics.get("embedded_now") or [])
        row.update(_data_facts(metrics))
    return row


def _data_facts(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the job's data file was, as read from the file (metrics.json), over the config: a
    synthetic file under a real name is synthetic whatever data.synthetic said. Older jobs
    without these keys keep the config's word."""
    keys = ("synthetic", "data_verified")
    return {key: metrics[key] for key in keys if isinstance(metrics.get(key), bool)}


def collect(sweep_dir: str | Path, exclude: Path | None = None) -> pd.DataFrame:
    """All jobs of a sweep as a DataFrame sorted like the paper (size, dataset, extractor)."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise CbmirError(f"{sweep}: no such sweep directory")
    jobs = find_job_dirs(sweep, exclude=exclude)
    if not jobs:
        raise CbmirError(
            f"{sweep}: no job directories (config_resolved.yaml / metrics.json / error.json) "
            "found; pass the sweep directory of a `cbmir -m ...` run"
        )
    df = pd.DataFrame([job_row(job, sweep) for job in jobs])
    for _, col, _ in METRICS:
        for suffix in ("", "_low", "_high"):
            if f"{col}{suffix}" not in df:
                df[f"{col}{suffix}"] = np.nan
    return sort_rows(df)


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    order = df.assign(
        _size=df["size"].fillna(-1),
        _dataset=df["dataset"].map(dataset_order),
        _model=df["model"].map(model_order),
    ).sort_values(["_size", "_dataset", "_model", "setting", "job"])
    return order.drop(columns=["_size", "_dataset", "_model"]).reset_index(drop=True)


def finished(df: pd.DataFrame) -> pd.DataFrame:
    """Finished jobs, one per (size, dataset, model, setting): the most recently committed wins
    (e.g. the same job re-run under a later cbmir, in a new directory)."""
    done = df[df["status"] == "finished"].sort_values("committed_at", kind="stable")
    keys = ["size", "dataset", "model", "setting"]
    duplicated = done.duplicated(keys, keep=False)
    if duplicated.any():
        log.warning(
            "%d finished jobs share size/dataset/model/setting; the tables keep one of each: %s",
            int(duplicated.sum()),
            ", ".join(done.loc[duplicated, "job"]),
        )
    kept = done.drop_duplicates(keys, keep="last")
    return kept.loc[df.index.intersection(kept.index)].reset_index(drop=True)
