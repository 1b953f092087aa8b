"""From a search function to every requested metric: one search, sized for the metric set.

Without R-precision / MAP@R the search asks for k neighbours, exactly as before. With them it
asks, block by block, for max(k, R_q) neighbours (`metric_set.r_search`), scores each block's
full lists for the R metrics and keeps only the top k for everything else (and for
`neighbors.npz`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cbmir.retrieval import metric_names as mn
from cbmir.retrieval import metric_set as ms
from cbmir.retrieval.labels import LabelsLike, encode_pair, relevance
from cbmir.retrieval.metrics import compute_retrieval_metrics


def search_and_score(
    search: ms.Search,
    query_labels: LabelsLike,
    db_labels: LabelsLike,
    *,
    k: int,
    acc_ks: Sequence[int],
    metrics: Sequence[str] = mn.PAPER_METRICS,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(top-k distances, top-k indices, metrics with ``per_query``) of every query.

    `search(rows, width)` returns the (distances, indices) [len(rows), width] of those query
    rows (an int64 tensor of row numbers).
    """
    names = mn.check_metrics(metrics, "metrics")
    n_q = int(np.asarray(query_labels).shape[0])
    n_db = int(np.asarray(db_labels).shape[0])
    wanted_r = [n for n in names if n in mn.R_METRICS]
    if not wanted_r:
        distances, indices = search(torch.arange(n_q), k)
        return distances, indices, _score_top_k(indices, query_labels, db_labels, k, acc_ks, names)

    q_hot, d_hot = encode_pair(query_labels, db_labels)
    counts = ms.relevant_counts(q_hot, d_hot)
    values = {name: torch.zeros(n_q, dtype=torch.float32) for name in wanted_r}

    def on_block(rows: torch.Tensor, idx: torch.Tensor) -> None:
        rel = relevance(q_hot[rows], d_hot[idx.to(torch.int64)])
        for name, v in ms.r_metrics_per_query(wanted_r, rel, counts[rows]).items():
            values[name][rows] = v

    distances, indices = ms.r_search(search, counts, k, n_db, on_block)
    rest = [n for n in names if n not in mn.R_METRICS]
    result = _score_top_k(indices, query_labels, db_labels, k, acc_ks, rest) if rest else {}
    per_query = dict(result.pop("per_query", {}))
    for name in wanted_r:
        mean = ms.QueryMean()
        mean.update(values[name])
        result[name] = float(mean.compute())
        per_query[name] = values[name].numpy()
    result["per_query"] = per_query
    return distances, indices, result


def _score_top_k(
    indices: torch.Tensor,
    query_labels: LabelsLike,
    db_labels: LabelsLike,
    k: int,
    acc_ks: Sequence[int],
    names: Sequence[str],
) -> dict[str, Any]:
    return compute_retrieval_metrics(
        indices,
        query_labels,
        db_labels,
        map_k=k,
        acc_ks=acc_ks,
        mmv_k=k,
        return_per_query=True,
        metrics=names,
    )
