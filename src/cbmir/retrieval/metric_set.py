"""The configurable retrieval metric set: the paper's five plus precision, recall, nDCG, MRR,
R-precision and MAP@R (`retrieval.metrics`, docs/statistics.md has every definition).

Relevance is the one rule of `cbmir.retrieval.labels` (same class; multi-label: the multi-hot
rows intersect). R_q, the number of database items relevant to query q (its class count in the
database), is what recall@k, nDCG@k, R-precision and MAP@R need beyond the retrieved list. A
query with R_q = 0 scores 0 on those four (pytorch-metric-learning drops such "lone" queries
from its mean instead; every query keeps a value here so that queries pair across extractors).

R-precision and MAP@R read each query's first R_q neighbours, so `search_and_score` searches
once with k' = max(k, R_q) per block of queries (sorted by R_q, so each block asks only for
its own largest R). Memory: one block's [rows, k'] neighbours (int64 + float32) and their
[rows, k', C] label gather, held near `BLOCK_BYTES` by the block's height, never queries x
database; the search itself blocks the database as `knn_search` always does. The cost is the
search time of k' instead of k neighbours (e.g. k' ~ 13k for PathMNIST's largest class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from cbmir.errors import ConfigError

#: bytes one search block of [rows, k'] neighbours may take (see the module docstring)
BLOCK_BYTES = 128 * 2**20
_BYTES_PER_NEIGHBOUR = 48  # int64 index + float32 distance, the search's shortlist and gathers


def metric_key(name: str, k: int) -> str:
    """``precision@k`` -> ``precision@5``: the key in metrics.json and per_query.npz."""
    return name.replace("@k", f"@{k}")


def relevant_counts(query_multihot: torch.Tensor, db_multihot: torch.Tensor) -> torch.Tensor:
    """R_q per query (int64 [Q]): database rows relevant to it, by the one relevance rule.

    Relevance depends only on the query's multi-hot row, so each distinct row is counted once,
    in column blocks that keep the [N, rows] product near BLOCK_BYTES.
    """
    patterns, inverse = torch.unique(query_multihot, dim=0, return_inverse=True)
    db = db_multihot.to(torch.float32)
    step = max(1, BLOCK_BYTES // (4 * max(1, db.shape[0])))
    counts = [
        ((db @ patterns[s : s + step].T.to(torch.float32)) > 0).sum(dim=0)
        for s in range(0, patterns.shape[0], step)
    ]
    per_pattern = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64)
    return per_pattern.to(torch.int64)[inverse]


def _top(rel: torch.Tensor, k: int) -> torch.Tensor:
    if rel.ndim != 2 or not 1 <= k <= rel.shape[1]:
        raise ConfigError(f"k={k} needs a [Q, >={k}] relevance matrix, got {tuple(rel.shape)}")
    return rel[:, :k].to(torch.float64)


def precision_at_k(rel: torch.Tensor, k: int) -> torch.Tensor:
    """Relevant items among the top k, divided by k."""
    return (_top(rel, k).sum(dim=1) / k).float()


def recall_at_k(rel: torch.Tensor, k: int, counts: torch.Tensor) -> torch.Tensor:
    """Relevant items among the top k, divided by R_q (0 when R_q = 0)."""
    hits = _top(rel, k).sum(dim=1)
    return torch.where(counts > 0, hits / counts.clamp_min(1), 0.0).float()


def _discounts(n: int) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(2, n + 2, dtype=torch.float64))


def ndcg_at_k(rel: torch.Tensor, k: int, counts: torch.Tensor) -> torch.Tensor:
    """Binary-gain DCG@k over the ideal DCG of min(R_q, k) relevant items at the top.

    The ideal counts relevant items in the whole database, not only the retrieved ones (what
    torchmetrics' RetrievalNormalizedDCG would see when fed the top k alone).
    """
    disc = _discounts(k)
    dcg = (_top(rel, k) * disc).sum(dim=1)
    ideal = torch.cat([torch.zeros(1, dtype=torch.float64), disc.cumsum(0)])
    idcg = ideal[counts.clamp(0, k)]
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-300), 0.0).float()


def reciprocal_rank(rel: torch.Tensor, k: int) -> torch.Tensor:
    """1 / rank of the first relevant item within the top k; 0 when none is (MRR@k)."""
    r = _top(rel, k) > 0
    first = r.to(torch.int64).argmax(dim=1).to(torch.float64) + 1
    return torch.where(r.any(dim=1), 1.0 / first, 0.0).float()


def _within_r(rel: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rel restricted to each query's first R_q columns (rel must be that wide)."""
    width = int(counts.max()) if counts.numel() else 0
    if rel.ndim != 2 or rel.shape[1] < width:
        raise ConfigError(
            f"R-neighbour metrics need {width} neighbours per query, got {tuple(rel.shape)}"
        )
    cols = torch.arange(rel.shape[1])
    return rel.bool() & (cols[None, :] < counts[:, None])


def r_precision(rel: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Relevant items among the first R_q retrieved, divided by R_q (0 when R_q = 0)."""
    hits = _within_r(rel, counts).sum(dim=1).to(torch.float64)
    return torch.where(counts > 0, hits / counts.clamp_min(1), 0.0).float()


def map_at_r(rel: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """MAP@R: sum of precision@i over relevant ranks i <= R_q, divided by R_q (0 when R_q = 0).

    As pytorch-metric-learning's AccuracyCalculator (`mean_average_precision_at_r`): the
    denominator is R_q, not the relevant items found.
    """
    r = _within_r(rel, counts).to(torch.float64)
    ranks = torch.arange(1, r.shape[1] + 1, dtype=torch.float64)
    total = (r.cumsum(dim=1) / ranks * r).sum(dim=1)
    return torch.where(counts > 0, total / counts.clamp_min(1), 0.0).float()


class QueryMean(Metric):
    """Mean over queries of a per-query metric (sum and count states, DDP-reducible): the
    torchmetrics home of the metrics torchmetrics lacks (database-wide recall/nDCG, R-based)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("total", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("count", default=zero.clone(), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total += values.to(torch.float64).sum().to(self.total)
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count if self.count > 0 else torch.tensor(0.0)


def k_metrics_per_query(
    names: Sequence[str], rel: torch.Tensor, k: int, counts: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The requested precision/recall/nDCG@k and MRR per query from the top-k relevance."""
    funcs: dict[str, Callable[[], torch.Tensor]] = {
        "precision@k": lambda: precision_at_k(rel, k),
        "recall@k": lambda: recall_at_k(rel, k, _need(counts)),
        "ndcg@k": lambda: ndcg_at_k(rel, k, _need(counts)),
        "mrr": lambda: reciprocal_rank(rel, k),  # MRR@k, its key without a k
    }
    return {metric_key(name, k): funcs[name]() for name in names if name in funcs}


def r_metrics_per_query(
    names: Sequence[str], rel: torch.Tensor, counts: torch.Tensor
) -> dict[str, torch.Tensor]:
    """R-precision and MAP@R per query from relevance at least max(R_q) wide."""
    funcs = {"r_precision": r_precision, "map@r": map_at_r}
    return {name: funcs[name](rel, counts) for name in names if name in funcs}


def _need(counts: torch.Tensor | None) -> torch.Tensor:
    if counts is None:
        raise ConfigError("recall@k and ndcg@k need the relevant counts R_q of the database")
    return counts


Search = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def r_search(
    search: Search,
    counts: torch.Tensor,
    k: int,
    n_database: int,
    on_block: Callable[[torch.Tensor, torch.Tensor], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search every query once with k' = max(k, R_q) neighbours, in blocks sorted by R_q.

    `search(rows, width)` returns (distances, indices) [len(rows), width] of those query rows;
    `on_block(rows, indices)` scores each block's full lists. Returns the top-k distances and
    indices of every query (exact search: the same as a search for k alone).
    """
    n_q = counts.shape[0]
    top_d = torch.empty((n_q, k), dtype=torch.float32)
    top_i = torch.empty((n_q, k), dtype=torch.int64)
    order = torch.argsort(counts, stable=True)
    start = 0
    while start < n_q:
        height = n_q - start
        while True:  # R ascends along `order`: the block's last row sets its width
            rows = order[start : start + height]
            width = min(n_database, max(k, int(counts[rows[-1]])))
            cap = max(1, BLOCK_BYTES // (_BYTES_PER_NEIGHBOUR * width))
            if height <= cap:
                break
            height = cap
        dist, idx = search(rows, width)
        on_block(rows, idx)
        top_d[rows], top_i[rows] = dist[:, :k].float(), idx[:, :k]
        start += height
    return top_d, top_i
