"""The significance part of a sweep's report: paired tests per dataset and size, Friedman +
Nemenyi across datasets (critical-difference diagrams), and the job-by-job comparison of two
sweeps (`cbmir-report A B --compare`). The statistics themselves live in `significance`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cbmir.errors import CbmirError, DataError
from cbmir.report import significance as sig
from cbmir.report.collect import config_value, load_job_config
from cbmir.report.names import METRICS, is_metric_key, sizes_of
from cbmir.report.tables import extra_columns, fmt, markdown_table

log = logging.getLogger(__name__)

GROUP = ["size", "dataset", "setting"]


@dataclass
class Significance:
    """Pairwise tests (one row per pair and metric), per-size Markdown, Friedman rows, notes."""

    pairs: pd.DataFrame
    tables: dict[int | None, str] = field(default_factory=dict)
    friedman: pd.DataFrame = field(default_factory=pd.DataFrame)
    cd_inputs: list[tuple[str, int | None, sig.FriedmanResult]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def job_results(sweep_dir: Path, job: str) -> sig.QueryResults:
    """A finished job's per-query results and query-set identity, from its own files."""
    job_dir = sweep_dir / job
    try:
        metrics = json.loads((job_dir / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{job_dir}: cannot read metrics.json ({exc})") from exc
    split = str(config_value(load_job_config(job_dir), "data.query_split", "test"))
    return sig.load_query_results(job_dir, metrics, split)


def metric_order(keys: set[str]) -> list[str]:
    """The paper's metrics first, in its order, then the rest alphabetically."""
    paper = [key for key, _, _ in METRICS if key in keys]
    return paper + sorted(k for k in keys if k not in paper and is_metric_key(k))


def group_tests(
    results: dict[str, sig.QueryResults], n_permutations: int = 10_000
) -> tuple[pd.DataFrame, dict[str, tuple[list[str], list[str]]]]:
    """Pairwise tests of every common metric, and per metric (best, not significantly worse)."""
    sig.check_pairable(results)
    common = set.intersection(*(set(r.values) for r in results.values()))
    rows, marks = [], {}
    for metric in metric_order(common):
        values = {name: r.values[metric] for name, r in results.items()}
        pairs = sig.pairwise_tests(values, n_permutations=n_permutations)
        pairs.insert(0, "metric", metric)
        rows.append(pairs)
        means = {name: float(np.mean(v)) for name, v in values.items()}
        marks[metric] = sig.top_group(means, pairs)
    return (pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()), marks


def sweep_significance(
    done: pd.DataFrame, sweep_dir: Path, n_permutations: int = 10_000
) -> Significance:
    """Paired tests per (size, dataset, setting) among its extractors; Friedman per size."""
    frames, notes = [], []
    marks: dict[tuple[object, ...], dict[str, tuple[list[str], list[str]]]] = {}
    for key, group in done.groupby(GROUP, dropna=False, sort=False):
        if group["model"].nunique() < 2:
            continue
        label = f"{group['dataset_paper'].iloc[0]} at {_size_text(key[0])}"
        try:
            results = {
                str(row["model_paper"]): job_results(sweep_dir, str(row["job"]))
                for _, row in group.iterrows()
            }
            pairs, marks[key] = group_tests(results, n_permutations)
        except DataError as exc:
            notes.append(f"{label}: not tested: {exc}")
            continue
        for name, value in zip(GROUP, key, strict=True):
            pairs.insert(GROUP.index(name), name, value)
        frames.append(pairs)
    pairs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out = Significance(pairs=pairs, notes=notes)
    for size in sizes_of(done):
        at = done[done["size"].isna()] if size is None else done[done["size"] == size]
        table = marked_table(at, marks)
        if table:
            out.tables[size] = table
    _friedman(done, out)
    return out


def _size_text(size: object) -> str:
    return "no size" if pd.isna(size) else f"{size} px"


def _cell(value: object, name: str, mark: tuple[list[str], list[str]] | None) -> str:
    text = fmt(value)
    if mark is None or text == fmt(None):
        return text
    best, tied = mark
    if name in best:
        return f"**{text}**"
    return f"*{text}*" if name in tied else text


def marked_table(at: pd.DataFrame, marks: dict) -> str:
    """Dataset | Extractor | metrics in %: **best**, *not significantly worse than the best*."""
    columns = [(key, col, title) for key, col, title in METRICS if at[col].notna().any()]
    k_of = {col: title for col, title in extra_columns(at)}
    columns += [(col.replace("_at_", "@"), col, title) for col, title in k_of.items()]
    rows, previous = [], None
    for _, row in at.iterrows():
        key = tuple(row[g] for g in GROUP)
        group_marks = next((m for k, m in marks.items() if _same(k, key)), None)
        if group_marks is None:
            continue
        label = row["dataset_paper"] if row["dataset_paper"] != previous else ""
        previous = row["dataset_paper"]
        name = str(row["model_paper"])
        extractor = f"{name} ({row['setting']})" if row.get("setting") else name
        cells = [_cell(row[col], name, group_marks.get(key_)) for key_, col, _ in columns]
        rows.append([label, extractor, *cells])
    if not rows:
        return ""
    header = ["Dataset", "Extractor", *(title for _, _, title in columns)]
    return markdown_table(header, rows, "ll" + "r" * len(columns))


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return all((x == y) or (pd.isna(x) and pd.isna(y)) for x, y in zip(a, b, strict=True))


def _friedman(done: pd.DataFrame, out: Significance) -> None:
    """Friedman + Nemenyi per size and metric over the plain jobs (no extra overrides)."""
    plain = done[done["setting"] == ""]
    rows = []
    for size in sizes_of(plain):
        at = plain[plain["size"].isna()] if size is None else plain[plain["size"] == size]
        columns = [(key, col) for key, col, _ in METRICS if at[col].notna().any()]
        columns += [(col.replace("_at_", "@"), col) for col, _ in extra_columns(at)]
        for key, col in columns:
            block = sig.complete_block(at, col)
            if block.shape[1] < 3 or block.shape[0] < 2:
                continue
            result = sig.friedman_nemenyi(block)
            out.cd_inputs.append((key, size, result))
            rows.append(
                {
                    "size": size,
                    "metric": key,
                    "n_datasets": result.n_datasets,
                    "n_extractors": block.shape[1],
                    "friedman_chi2": result.statistic,
                    "friedman_p": result.pvalue,
                    "critical_difference": result.critical_difference,
                    **{f"rank_{name}": rank for name, rank in result.avg_ranks.items()},
                }
            )
    if not rows and not plain.empty:
        out.notes.append(
            "No critical-difference diagram: it needs >= 3 extractors measured on each of "
            ">= 2 datasets at one size."
        )
    out.friedman = pd.DataFrame(rows)


# -- two sweeps ---------------------------------------------------------------------------------
COMPARE_KEY = ["size", "dataset", "model"]


def compare_sweeps(
    done_a: pd.DataFrame,
    sweep_a: Path,
    done_b: pd.DataFrame,
    sweep_b: Path,
    n_permutations: int = 10_000,
) -> pd.DataFrame:
    """Job by job (same size, dataset, extractor): A - B per metric with the paired tests, Holm
    across all matched jobs of one metric. DataError when a matched pair's queries differ."""
    for name, done in (("A", done_a), ("B", done_b)):
        dup = done.duplicated(COMPARE_KEY, keep=False)
        if dup.any():
            raise CbmirError(
                f"sweep {name} has several finished jobs per size/dataset/extractor "
                f"({', '.join(done.loc[dup, 'job'])}); compare sweeps with one setting each"
            )
    matched = done_a.merge(done_b, on=COMPARE_KEY, suffixes=("_a", "_b"))
    if matched.empty:
        raise CbmirError("the two sweeps share no size/dataset/extractor job to compare")
    rows = []
    for _, row in matched.iterrows():
        a = job_results(sweep_a, str(row["job_a"]))
        b = job_results(sweep_b, str(row["job_b"]))
        sig.check_pairable({"A": a, "B": b})
        for metric in metric_order(set(a.values) & set(b.values)):
            diff, low, high = sig.paired_bootstrap(a.values[metric], b.values[metric])
            rows.append(
                {
                    "size": row["size"],
                    "dataset": row["dataset_paper_a"],
                    "extractor": row["model_paper_a"],
                    "metric": metric,
                    "a": 100 * float(np.mean(a.values[metric])),
                    "b": 100 * float(np.mean(b.values[metric])),
                    "diff": 100 * diff,
                    "diff_low": 100 * low,
                    "diff_high": 100 * high,
                    "p": sig.sign_flip_pvalue(a.values[metric], b.values[metric], n_permutations),
                    "job_a": row["job_a"],
                    "job_b": row["job_b"],
                }
            )
    table = pd.DataFrame(rows)
    table["p_holm"] = table.groupby("metric")["p"].transform(lambda p: sig.holm(p.to_numpy()))
    table["significant"] = table["p_holm"] < sig.ALPHA
    return table


def compare_table(table: pd.DataFrame) -> str:
    """Size | Dataset | Extractor | metric | A | B | A - B [95% CI] | p (Holm)."""
    rows = [
        [
            _size_text(row["size"]),
            row["dataset"],
            row["extractor"],
            row["metric"],
            fmt(row["a"]),
            fmt(row["b"]),
            f"{row['diff']:+.2f} [{row['diff_low']:+.1f}, {row['diff_high']:+.1f}]",
            f"{row['p_holm']:.3g}" + (" *" if row["significant"] else ""),
        ]
        for _, row in table.iterrows()
    ]
    header = ["Size", "Dataset", "Extractor", "Metric", "A", "B", "A - B [95% CI]", "p (Holm)"]
    return markdown_table(header, rows, "llllrrrr")
