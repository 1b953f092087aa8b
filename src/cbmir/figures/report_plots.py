"""Bar charts like the paper's figures: a metric (ACC@1) per dataset, extractors x sizes.

Drawn with matplotlib's object API on the Agg canvas (no display, no global backend switch),
with 95% bootstrap intervals as error bars and, with a reference, the published values as
black diamonds on their bars.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cbmir.report.names import METRICS, model_order, sizes_of

#: resolution of the report's PNGs (`cbmir.figures.png.save_png` writes a figure at its own dpi)
DPI = 120


def metric_column(metric: str) -> tuple[str, str]:
    """``acc@1`` -> (``acc_at_1``, ``ACC@1``)."""
    for key, col, title in METRICS:
        if metric in (key, col, title):
            return col, title
    col = metric.replace("@", "_at_")
    return col, metric


def _draw(
    ax,
    df: pd.DataFrame,
    col: str,
    reference: pd.DataFrame | None,
    legend: bool,
) -> None:
    models = sorted(df["model"].unique(), key=model_order)
    sizes = sizes_of(df)  # None last: custom data (data=npz) keeps its stored size
    width = 0.8 / max(len(sizes), 1)
    x = np.arange(len(models))
    colors = [f"C{i}" for i in range(len(sizes))]
    for i, size in enumerate(sizes):
        rows = df[df["size"].isna()] if size is None else df[df["size"] == size]
        at = rows.set_index("model")
        values = np.array([at[col].get(m, np.nan) for m in models], dtype=float)
        low = np.array([at[f"{col}_low"].get(m, np.nan) for m in models], dtype=float)
        high = np.array([at[f"{col}_high"].get(m, np.nan) for m in models], dtype=float)
        err = np.vstack([values - low, high - values])
        err = np.where(np.isnan(err), 0.0, err)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(
            pos,
            values,
            width,
            color=colors[i],
            label="stored size" if size is None else f"{size} px",
        )
        ax.errorbar(pos, values, yerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        if reference is not None and size is not None:
            ref = reference[reference["size"] == size].set_index("model")[col]
            paper = np.array([ref.get(m, np.nan) for m in models], dtype=float)
            ax.scatter(pos, paper, marker="D", s=14, color="black", zorder=3, label=None)
    if reference is not None and legend:
        ax.scatter([], [], marker="D", s=14, color="black", label="paper")
    names = [df.loc[df["model"] == m, "model_paper"].iloc[0] for m in models]
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    if legend:
        ax.figure.legend(fontsize=8, loc="outside right upper")


def dataset_figure(
    df: pd.DataFrame, dataset: str, metric: str = "acc@1", reference: pd.DataFrame | None = None
) -> Figure:
    """One dataset: bars per extractor, one colour per size, intervals and paper markers."""
    col, title = metric_column(metric)
    rows = df[df["dataset"] == dataset]
    ref = None if reference is None else reference[reference["dataset"] == dataset]
    fig = Figure(
        figsize=(max(5.0, 0.9 * rows["model"].nunique() + 2), 4), dpi=DPI, layout="constrained"
    )
    ax = fig.add_subplot()
    _draw(ax, rows, col, ref, legend=True)
    ax.set_title(f"{rows['dataset_paper'].iloc[0]}: {title} (%)")
    ax.set_ylabel(f"{title} (%)")
    return fig


def overview_figure(
    df: pd.DataFrame, metric: str = "acc@1", reference: pd.DataFrame | None = None
) -> Figure:
    """Every dataset of the sweep in one picture, like the paper's figure panels."""
    col, title = metric_column(metric)
    datasets = list(dict.fromkeys(df["dataset"]))
    ncols = min(len(datasets), 2)
    nrows = math.ceil(len(datasets) / ncols)
    n_models = df["model"].nunique()
    fig = Figure(
        figsize=(ncols * max(5.0, 0.9 * n_models + 2), nrows * 3.6), dpi=DPI, layout="constrained"
    )
    for i, dataset in enumerate(datasets):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        rows = df[df["dataset"] == dataset]
        ref = None if reference is None else reference[reference["dataset"] == dataset]
        _draw(ax, rows, col, ref, legend=i == 0)
        ax.set_title(str(rows["dataset_paper"].iloc[0]), fontsize=10)
        ax.set_ylabel(f"{title} (%)", fontsize=8)
    fig.suptitle(f"{title} per dataset, extractors x image sizes (95% bootstrap intervals)")
    return fig
