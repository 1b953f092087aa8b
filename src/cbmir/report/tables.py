"""Markdown tables laid out like the paper's Tables S.1-S.4: one per image size, dataset x
extractor rows, mAP@5 / mMV@5 / ACC@1 / ACC@3 / ACC@5 in percent, each with its 95% interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from cbmir.report.names import EXTRA_METRICS, METRICS

DASH = "—"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> str:
    """A GitHub pipe table; `align` holds one of l/r per column."""
    marks = {"l": ":---", "r": "---:"}
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(marks[a] for a in align) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value: object, digits: int = 2) -> str:
    return DASH if _missing(value) else f"{float(value):.{digits}f}"


def fmt_ci(value: object, low: object, high: object) -> str:
    """``83.18 [77.05, 88.46]``: the point estimate and its 95% interval, in percent."""
    if _missing(value):
        return DASH
    if _missing(low) or _missing(high):
        return fmt(value)
    return f"{float(value):.2f} [{float(low):.1f}, {float(high):.1f}]"


def fmt_diff(diff: object, outside: object) -> str:
    """``-2.31†``: ours minus paper; † when the published value is outside our interval."""
    if _missing(diff):
        return DASH
    return f"{float(diff):+.2f}" + ("†" if bool(outside) else "")


def _extractor(row: pd.Series) -> str:
    name = str(row["model_paper"])
    return f"{name} ({row['setting']})" if row.get("setting") else name


def _grouped(df: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """(dataset label shown only on a dataset's first row, row), in the frame's order."""
    first = df["dataset_paper"].ne(df["dataset_paper"].shift())
    rows = (row for _, row in df.iterrows())
    return [
        (row["dataset_paper"] if new else "", row) for new, row in zip(first, rows, strict=True)
    ]


def size_table(df: pd.DataFrame, size: int | None) -> str:
    """Measured metrics at one size (None: data without a MedMNIST size, e.g. data=npz):
    Dataset | Extractor | mAP@5 | ... with intervals."""
    at = df[df["size"].isna()] if size is None else df[df["size"] == size]
    rows = [
        [label, _extractor(row)]
        + [fmt_ci(row[col], row[f"{col}_low"], row[f"{col}_high"]) for _, col, _ in METRICS]
        for label, row in _grouped(at)
    ]
    header = ["Dataset", "Extractor", *(title for _, _, title in METRICS)]
    return markdown_table(header, rows, "ll" + "r" * len(METRICS))


def extra_columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, header) of the further metrics some job of `df` measured, in a fixed order."""
    out = []
    for prefix, title in EXTRA_METRICS:
        for col in sorted(c for c in df.columns if c.startswith(prefix)):
            rest = col[len(prefix) :]  # the k of an @k metric; nothing for mrr, map@r, ...
            ok = rest.isdigit() if prefix.endswith("_at_") else rest == ""
            if ok and df[col].notna().any():
                out.append((col, f"{title}{rest}"))
    return out


def extra_table(df: pd.DataFrame, size: int | None) -> str:
    """The further metrics at one size (only where some job measured them), with intervals."""
    at = df[df["size"].isna()] if size is None else df[df["size"] == size]
    columns = extra_columns(at)
    if not columns:
        return ""
    rows = [
        [label, _extractor(row)]
        + [fmt_ci(row[col], row.get(f"{col}_low"), row.get(f"{col}_high")) for col, _ in columns]
        for label, row in _grouped(at)
    ]
    header = ["Dataset", "Extractor", *(title for _, title in columns)]
    return markdown_table(header, rows, "ll" + "r" * len(columns))


def comparison_table(cmp: pd.DataFrame, size: int) -> str:
    """Ours beside the paper at one size: per metric ours, paper, difference."""
    header = ["Dataset", "Extractor"]
    for _, _, title in METRICS:
        header += [title, "paper", "Δ"]
    rows = []
    for label, row in _grouped(cmp[cmp["size"] == size]):
        cells = [label, _extractor(row)]
        for _, col, _ in METRICS:
            cells += [
                fmt(row[col]),
                fmt(row[f"paper_{col}"]),
                fmt_diff(row[f"diff_{col}"], row[f"outside_{col}"]),
            ]
        rows.append(cells)
    return markdown_table(header, rows, "ll" + "r" * 3 * len(METRICS))


def timing_table(df: pd.DataFrame) -> str:
    """Runtime per job, as the paper reported runtimes: embedding and search seconds."""
    header = ["Size", "Dataset", "Extractor", "embed s", "search s", "queries", "database"]
    rows = [
        [
            row["size"],
            row["dataset_paper"],
            _extractor(row),
            fmt(row.get("embed_seconds")),
            fmt(row.get("search_seconds"), 3),
            row.get("n_queries", DASH),
            row.get("n_database", DASH),
        ]
        for _, row in df.iterrows()
    ]
    return markdown_table(header, rows, "rllrrrr")


def problem_table(df: pd.DataFrame) -> str:
    """Failed and incomplete jobs: listed, never silently dropped."""
    rows = [
        [row["job"], row["status"], row["error"] or "no metrics.json or error.json (killed?)"]
        for _, row in df.iterrows()
    ]
    return markdown_table(["Job", "Status", "Error"], rows, "lll")
