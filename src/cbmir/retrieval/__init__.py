"""Exact k-NN retrieval (torch, optional faiss) and the paper's metrics (torchmetrics).

Exports resolve lazily so that `cbmir.retrieval.settings` (what validating a config needs) can
be imported without torchmetrics: a bad setting fails before the heavy imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MajorityVoteAccuracy": "cbmir.retrieval.metrics",
    "compute_retrieval_metrics": "cbmir.retrieval.metrics",
    "evaluate_retrieval": "cbmir.retrieval.evaluate",
    "knn_search": "cbmir.retrieval.search",
    "to_multihot": "cbmir.retrieval.labels",
}
__all__ = [
    "MajorityVoteAccuracy",
    "compute_retrieval_metrics",
    "evaluate_retrieval",
    "knn_search",
    "to_multihot",
]

if TYPE_CHECKING:
    from cbmir.retrieval.evaluate import evaluate_retrieval
    from cbmir.retrieval.labels import to_multihot
    from cbmir.retrieval.metrics import MajorityVoteAccuracy, compute_retrieval_metrics
    from cbmir.retrieval.search import knn_search


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cbmir.retrieval' has no attribute {name!r}")
