"""Critical-difference diagram (Demšar 2006): extractors by average rank across datasets.

The axis runs from rank 1 (best, left) to k; each extractor hangs from its average rank, the
better half labelled on the left, the rest on the right. A thick bar joins every maximal run of
extractors whose pairwise post-hoc p-values are all >= alpha (no significant difference); the
bracket above the axis is the Nemenyi critical difference.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure


def cliques(ranks: pd.Series, pvalues: pd.DataFrame, alpha: float) -> list[list[str]]:
    """Maximal runs of rank-ordered extractors with no significant pair inside (length >= 2)."""
    names = list(ranks.sort_values().index)
    runs: list[tuple[int, int]] = []
    for i in range(len(names)):
        j = i
        while j + 1 < len(names) and all(
            float(pvalues.loc[names[a], names[j + 1]]) >= alpha for a in range(i, j + 1)
        ):
            j += 1
        if j > i and not any(lo <= i and j <= hi for lo, hi in runs):
            runs.append((i, j))
    return [names[lo : hi + 1] for lo, hi in runs]


def cd_figure(
    ranks: pd.Series,
    pvalues: pd.DataFrame,
    critical_difference: float,
    title: str,
    alpha: float = 0.05,
) -> Figure:
    """The diagram for average `ranks` (extractor -> rank, 1 = best) and pairwise `pvalues`."""
    order = ranks.sort_values()
    k = len(order)
    groups = cliques(order, pvalues, alpha)
    n_left = (k + 1) // 2
    height = 1.4 + 0.32 * max(n_left, k - n_left) + 0.18 * len(groups)
    fig = Figure(figsize=(8.5, height))
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.86))
    ax.set_xlim(0.5 - 1.8, k + 0.5 + 1.8)  # room for the labels
    ax.set_ylim(-(max(n_left, k - n_left) + 0.5 + 0.3 * len(groups)), 1.6)
    ax.axis("off")
    ax.hlines(0, 1, k, color="black", lw=1)
    for r in range(1, k + 1):
        ax.vlines(r, 0, 0.15, color="black", lw=1)
        ax.text(r, 0.25, str(r), ha="center", va="bottom", fontsize=9)
    ax.hlines(1.15, 1, 1 + critical_difference, color="black", lw=1.5)
    ax.vlines([1, 1 + critical_difference], 1.05, 1.25, color="black", lw=1.5)
    ax.text(1 + critical_difference / 2, 1.3, f"CD = {critical_difference:.2f}", ha="center",
            va="bottom", fontsize=9)  # fmt: skip
    bar_y0 = -0.35
    for g, members in enumerate(groups):
        y = bar_y0 - 0.3 * g
        ax.hlines(y, order[members[0]] - 0.05, order[members[-1]] + 0.05, color="black", lw=4)
    label_y0 = bar_y0 - 0.3 * len(groups) - 0.4
    for i, (name, rank) in enumerate(order.items()):
        left = i < n_left
        row = i if left else k - 1 - i
        y = label_y0 - row
        x_text = 0.5 - 0.1 if left else k + 0.5 + 0.1
        ax.plot([rank, rank, x_text], [0, y, y], color="0.3", lw=0.8)
        ax.text(x_text + (-0.05 if left else 0.05), y, f"{name} ({rank:.2f})",
                ha="right" if left else "left", va="center", fontsize=9)  # fmt: skip
    fig.suptitle(title, fontsize=10)
    return fig
