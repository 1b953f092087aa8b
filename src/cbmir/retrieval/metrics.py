"""Retrieval metrics of Mahbod et al. 2024: mAP@k, ACC@k (hit rate) and mMV@k.

The reported numbers are computed with torchmetrics (`RetrievalMAP`, `RetrievalHitRate` and the
custom `MajorityVoteAccuracy` below) so they match the library the paper's protocol names. The
pure vectorised functions give the same values per query; they feed bootstrap intervals and
cross-check torchmetrics in the tests.

torchmetrics trap (>= 1.8): `retrieval_average_precision` does
``target = where(preds > 0, target, 0)``, i.e. a document whose score is <= 0 is treated as not
relevant. Feeding negated distances (all < 0) or negative cosine similarities silently gives
mAP = 0. We therefore feed only the top-k candidates, each with the strictly positive,
rank-preserving score ``(k - rank) / k`` (rank 0 is the nearest), never the distances.
Each distinct top-k relevance row is scored once and averaged with its query count as weight
(see `relevance_patterns`): identical values, no per-query Python loop in torchmetrics.

Definitions (torchmetrics 1.9 `functional/retrieval/average_precision.py` was read to confirm):
AP@k = sum over relevant ranks i <= k of precision@i, divided by the number of relevant items
within the top k (not by all relevant items in the database); 0 when none is relevant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP, RetrievalMRR, RetrievalPrecision

from cbmir.errors import ConfigError
from cbmir.retrieval import metric_names as mn
from cbmir.retrieval import metric_set as ms
from cbmir.retrieval.labels import LabelsLike, encode_pair, relevance
from cbmir.retrieval.settings import check_k


def _check_k(rel: torch.Tensor, k: int) -> torch.Tensor:
    if rel.ndim != 2:
        raise ConfigError(f"relevance must be [Q, k], got shape {tuple(rel.shape)}")
    if not 1 <= k <= rel.shape[1]:
        raise ConfigError(f"k={k} must be between 1 and the {rel.shape[1]} retrieved items")
    return rel[:, :k].bool()


def average_precision_at_k(rel: torch.Tensor, k: int) -> torch.Tensor:
    """Per-query AP@k from a rank-ordered relevance matrix [Q, >=k] (float32 [Q])."""
    r = _check_k(rel, k).float()
    hits = r.cumsum(dim=1)
    ranks = torch.arange(1, k + 1, dtype=torch.float32)
    precision_sum = (hits / ranks * r).sum(dim=1)
    n_rel = r.sum(dim=1)
    return torch.where(n_rel > 0, precision_sum / n_rel.clamp_min(1), torch.zeros_like(n_rel))


def hit_at_k(rel: torch.Tensor, k: int) -> torch.Tensor:
    """Per-query ACC@k: 1 if any of the top k is relevant (float32 [Q])."""
    return _check_k(rel, k).any(dim=1).float()


def majority_vote_correct(
    query_multihot: torch.Tensor, neighbor_multihot: torch.Tensor, k: int
) -> torch.Tensor:
    """Per-query mMV@k: vote per label column over the top k; all top-voted columns win.

    Correct when the query is positive in any winning column, so a tie counts as correct if
    any tied class is the query's (single-label), and the "no positive label" column votes
    like a class (multi-label).
    """
    if neighbor_multihot.ndim != 3 or not 1 <= k <= neighbor_multihot.shape[1]:
        raise ConfigError(
            f"neighbour labels must be [Q, >=k, C] with k={k}, got {tuple(neighbor_multihot.shape)}"
        )
    votes = neighbor_multihot[:, :k].to(torch.int64).sum(dim=1)
    winners = votes == votes.max(dim=1, keepdim=True).values
    return (winners & query_multihot.bool()).any(dim=1).float()


class MajorityVoteAccuracy(Metric):
    """mMV@k as a torchmetrics Metric (sums of correct and total queries, DDP-reducible)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, k: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = check_k(k)
        self.add_state(
            "correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, query_multihot: torch.Tensor, neighbor_multihot: torch.Tensor) -> None:
        hits = majority_vote_correct(query_multihot, neighbor_multihot, self.k)
        self.correct += hits.sum().to(self.correct)
        self.total += hits.numel()

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(0.0)
        return (self.correct / self.total).float()


def rank_scores(n_queries: int, k: int) -> torch.Tensor:
    """Strictly positive, strictly decreasing scores (k - rank) / k in (0, 1] for torchmetrics."""
    return ((k - torch.arange(k, dtype=torch.float32)) / k).expand(n_queries, k)


def relevance_patterns(rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of a [Q, k] relevance matrix and how many queries have each.

    A query's AP@k and ACC@k depend only on its row, so torchmetrics scores each distinct row
    once (at most 2^k of them) and the mean is weighted by the counts: the same value as
    feeding every query, without torchmetrics' per-query Python loop.
    """
    k = rel.shape[1]
    if k <= 16:
        ids = (rel.to(torch.int64) << torch.arange(k)).sum(dim=1)
        counts = torch.bincount(ids, minlength=2**k)
        present = counts.nonzero().squeeze(1)
        patterns = ((present[:, None] >> torch.arange(k)) & 1).bool()
        return patterns, counts[present]
    patterns, counts = torch.unique(rel.to(torch.uint8), dim=0, return_counts=True)
    return patterns.bool(), counts


def _torchmetrics_retrieval(metric_cls: type[Metric], rel: torch.Tensor, k: int) -> float:
    """Mean over queries of a torchmetrics retrieval metric @k, fed only the top k."""
    if rel.shape[0] == 0:
        return 0.0
    patterns, counts = relevance_patterns(rel[:, :k])
    weights = counts.to(torch.float64)

    def weighted_mean(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        return (values.to(torch.float64) * weights).sum() / weights.sum()

    # empty_target_action="neg" (the default) keeps one value per group, in index order, so
    # the values line up with `weights`; "skip" would drop rows and must not be used here.
    metric = metric_cls(top_k=k, aggregation=weighted_mean, empty_target_action="neg")
    n = patterns.shape[0]
    metric.update(
        rank_scores(n, k).reshape(-1), patterns.reshape(-1), torch.arange(n).repeat_interleave(k)
    )
    return float(metric.compute())


def compute_retrieval_metrics(
    indices: torch.Tensor | np.ndarray,
    query_labels: LabelsLike,
    db_labels: LabelsLike,
    *,
    map_k: int = 5,
    acc_ks: Sequence[int] = (1, 3, 5),
    mmv_k: int = 5,
    return_per_query: bool = False,
    metrics: Sequence[str] = mn.PAPER_METRICS,
) -> dict[str, Any]:
    """mAP@map_k, mMV@mmv_k and ACC@k for each k in acc_ks from the neighbour indices [Q, k'],
    and the further `metrics` (`cbmir.retrieval.metric_set`, at k = map_k).

    Values are python floats in [0, 1] computed with torchmetrics, keyed ``map@5``, ``mmv@5``,
    ``acc@1`` ... With `return_per_query`, ``per_query`` holds the same metrics per query
    (numpy float32 arrays whose means are the reported values) for bootstrap intervals.
    R-precision and MAP@R need each query's R_q neighbours: indices at least max(R_q) wide
    (`cbmir.retrieval.scoring.search_and_score` searches that way, block by block).
    """
    names = mn.check_metrics(metrics, "metrics")
    idx = torch.as_tensor(indices).detach().cpu().to(torch.int64)
    if idx.ndim != 2:
        raise ConfigError(f"indices must be [Q, k], got shape {tuple(idx.shape)}")
    n_q, width = idx.shape
    ks = [int(map_k), int(mmv_k), *(int(a) for a in acc_ks)]
    if any(k < 1 or k > width for k in ks):
        raise ConfigError(f"metric ks {ks} must be between 1 and the {width} retrieved neighbours")
    q_hot, d_hot = encode_pair(query_labels, db_labels)
    if q_hot.shape[0] != n_q:
        raise ConfigError(f"{q_hot.shape[0]} query labels for {n_q} rows of neighbour indices")
    if n_q and (int(idx.min()) < 0 or int(idx.max()) >= d_hot.shape[0]):
        raise ConfigError(f"neighbour indices out of range for {d_hot.shape[0]} database labels")
    neighbor_hot = d_hot[idx]
    rel = relevance(q_hot, neighbor_hot)

    out: dict[str, Any] = {}
    if "map@k" in names:
        out[f"map@{map_k}"] = _torchmetrics_retrieval(RetrievalMAP, rel, map_k)
    if "mmv@k" in names:
        mmv = MajorityVoteAccuracy(k=mmv_k)
        mmv.update(q_hot, neighbor_hot)
        out[f"mmv@{mmv_k}"] = float(mmv.compute())
    if "acc@k" in names:
        for a in acc_ks:
            out[f"acc@{a}"] = _torchmetrics_retrieval(RetrievalHitRate, rel, a)
    counts = ms.relevant_counts(q_hot, d_hot) if set(names) & set(mn.COUNT_METRICS) else None
    extra = {
        **ms.k_metrics_per_query(names, rel, map_k, counts),
        **(ms.r_metrics_per_query(names, rel, counts) if counts is not None else {}),
    }
    out.update(_extra_means(extra, rel, map_k))
    if return_per_query:
        per_query = {
            f"map@{map_k}": average_precision_at_k(rel, map_k) if "map@k" in names else None,
            f"mmv@{mmv_k}": (
                majority_vote_correct(q_hot, neighbor_hot, mmv_k) if "mmv@k" in names else None
            ),
            **{f"acc@{a}": hit_at_k(rel, a) if "acc@k" in names else None for a in acc_ks},
            **extra,
        }
        out["per_query"] = {key: v.numpy() for key, v in per_query.items() if v is not None}
    return out


def _extra_means(extra: dict[str, torch.Tensor], rel: torch.Tensor, k: int) -> dict[str, float]:
    """Means of the further metrics: torchmetrics' own RetrievalPrecision and RetrievalMRR
    (fed the top k, as mAP@k), `QueryMean` for those torchmetrics lacks."""
    library = {f"precision@{k}": RetrievalPrecision, "mrr": RetrievalMRR}
    out: dict[str, float] = {}
    for key, values in extra.items():
        if key in library:
            out[key] = _torchmetrics_retrieval(library[key], rel, k)
        else:
            mean = ms.QueryMean()
            mean.update(values)
            out[key] = float(mean.compute())
    return out
