"""One call from embeddings to the paper's retrieval metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cbmir.errors import ConfigError
from cbmir.retrieval.labels import LabelsLike
from cbmir.retrieval.metrics import compute_retrieval_metrics
from cbmir.retrieval.search import knn_search
from cbmir.retrieval.settings import PAPER_ACC_KS


def metric_ks(k: int) -> tuple[int, ...]:
    """ACC@1/3/5 capped at k (k=5 gives exactly the paper's acc@1, acc@3, acc@5)."""
    return tuple(sorted({min(a, k) for a in PAPER_ACC_KS}))


def _n_rows(labels: LabelsLike) -> int:
    return int(labels.shape[0]) if hasattr(labels, "shape") else len(labels)


def evaluate_retrieval(
    query_emb: np.ndarray | torch.Tensor,
    query_labels: LabelsLike,
    db_emb: np.ndarray | torch.Tensor,
    db_labels: LabelsLike,
    k: int = 5,
    distance: str = "euclidean",
    *,
    return_per_query: bool = False,
    **search_kwargs: Any,
) -> dict[str, Any]:
    """k-NN search of the queries in the database, then map@k, mmv@k and acc@{1,3,5 capped at k}.

    Returns python floats plus ``n_queries`` and ``n_database`` (and ``per_query`` arrays when
    asked). NaN/Inf embeddings raise EmbeddingError; label/embedding count mismatches ConfigError.
    """
    for name, emb, labels in (
        ("query", query_emb, query_labels),
        ("database", db_emb, db_labels),
    ):
        n_emb, n_lab = int(emb.shape[0]), _n_rows(labels)
        if n_emb != n_lab:
            raise ConfigError(f"{n_emb} {name} embeddings but {n_lab} {name} labels")
    _, indices = knn_search(query_emb, db_emb, k, distance, **search_kwargs)
    result = compute_retrieval_metrics(
        indices,
        query_labels,
        db_labels,
        map_k=k,
        acc_ks=metric_ks(k),
        mmv_k=k,
        return_per_query=return_per_query,
    )
    result["n_queries"] = int(query_emb.shape[0])
    result["n_database"] = int(db_emb.shape[0])
    return result
