"""Exact k-NN retrieval (torch, optional faiss) and the paper's metrics (torchmetrics)."""

from cbmir.retrieval.evaluate import evaluate_retrieval
from cbmir.retrieval.labels import to_multihot
from cbmir.retrieval.metrics import MajorityVoteAccuracy, compute_retrieval_metrics
from cbmir.retrieval.search import knn_search

__all__ = [
    "MajorityVoteAccuracy",
    "compute_retrieval_metrics",
    "evaluate_retrieval",
    "knn_search",
    "to_multihot",
]
