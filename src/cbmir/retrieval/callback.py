"""The retrieval stage as a Lightning callback: search + metrics once embeddings exist."""

from __future__ import annotations

import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from cbmir.io_utils import write_json, write_npz
from cbmir.retrieval.bootstrap import bootstrap_cis
from cbmir.retrieval.labels import LabelsLike
from cbmir.retrieval.metric_names import PAPER_METRICS
from cbmir.retrieval.metric_set import Search
from cbmir.retrieval.settings import RetrievalSettings, resolve_device
from cbmir.store import EmbeddingStore

log = logging.getLogger(__name__)

#: fewer queries get no bootstrap interval (`query_intervals`)
MIN_CI_QUERIES = 5


class ScoringCallback(Callback, ABC):
    """Scores stored embeddings at the end of a predict run (`evaluate`), or when called
    directly because every embedding was already in the store."""

    metrics: dict[str, Any] | None = None
    per_query: dict[str, np.ndarray] | None = None

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:  # DDP: rank 0 alone, once the ranks have parted (pipeline)
            self.evaluate(trainer)

    @abstractmethod
    def evaluate(self, trainer: L.Trainer | None = None) -> dict[str, Any]:
        """Score, write and log the results; what each subclass scores."""


class RetrievalCallback(ScoringCallback):
    """Searches the database split with the query split and scores the neighbours.

    Runs at the end of prediction, or directly through `evaluate()` when every embedding was
    already in the store. Writes `metrics.json` and `neighbors.npz` into `output_dir` and logs
    the metrics to every logger of the trainer.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        query_key: str,
        database_key: str,
        output_dir: str | Path,
        k: int = 5,
        distance: str = "euclidean",
        acc_ks: tuple[int, ...] = (1, 3, 5),
        device: str = "auto",
        search: dict[str, Any] | None = None,
        backend: str = "torch",
        faiss: dict[str, Any] | None = None,
        embedded_now: list[str] | None = None,
        data_facts: dict[str, Any] | None = None,
        metrics: Sequence[str] | str = PAPER_METRICS,
    ) -> None:
        self.settings = RetrievalSettings.from_config(
            {
                "k": k,
                "distance": distance,
                "acc_ks": acc_ks,
                "device": device,
                "search": search,
                "backend": backend,
                "faiss": faiss,
                "metrics": metrics,
            }
        )  # the pipeline checked these before embedding; direct callers get the same rules
        self.store = store
        self.query_key, self.database_key = query_key, database_key
        self.output_dir = Path(output_dir)
        self.embedded_now = list(embedded_now or [])
        self.data_facts = dict(data_facts or {})  # synthetic / data_verified, from the data file

    def evaluate(self, trainer: L.Trainer | None = None) -> dict[str, Any]:
        queries = self.store.load(self.query_key)
        database = self.store.load(self.database_key)
        started = time.perf_counter()
        device = resolve_device(self.settings.device)
        q, db = _as_tensor(queries.embeddings, device), _as_tensor(database.embeddings, device)
        distances, indices, metrics, self.per_query = score_queries(
            lambda rows, width: self._search(q, db, rows, width, database.path),
            queries.labels,
            database.labels,
            k=self.settings.k,
            acc_ks=self.settings.acc_ks,
            metrics=self.settings.metrics,
        )
        search_seconds = time.perf_counter() - started
        metrics.update(
            n_queries=int(len(queries.labels)),
            n_database=int(len(database.labels)),
            k=self.settings.k,
            distance=self.settings.distance,
            backend=self.settings.backend,
            embed_seconds=float(
                queries.manifest.get("embed_seconds", 0.0)
                + database.manifest.get("embed_seconds", 0.0)
            ),
            search_seconds=search_seconds,
            ci95=query_intervals(self.per_query),
            embedded_now=self.embedded_now,
            query_entry=str(queries.path),
            database_entry=str(database.path),
            **self.data_facts,
        )
        neighbours = {
            "indices": indices.cpu().numpy(),
            "distances": distances.cpu().numpy(),
            "query_labels": np.asarray(queries.labels),
        }
        publish_results(self.output_dir, metrics, self.per_query, neighbours, trainer)
        summary = ", ".join(f"{name}={metrics[name]:.4f}" for name in metrics if "@" in name)
        log.info(
            "retrieval %s: %s (%d queries, %d database, search %.2fs)",
            self.settings.distance,
            summary,
            metrics["n_queries"],
            metrics["n_database"],
            search_seconds,
        )
        self.metrics = metrics
        return metrics

    def _search(
        self, q: torch.Tensor, db: torch.Tensor, rows: torch.Tensor, width: int, db_path: Path
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices) of the query `rows` with `width` neighbours each."""
        from cbmir.retrieval import knn_search
        from cbmir.retrieval.faiss_backend import knn_search_backend

        if not torch.equal(rows, torch.arange(q.shape[0])):  # a block of the R-metric search
            q = q[rows.to(q.device)]
        settings = self.settings
        if settings.backend == "torch":
            return knn_search(q, db, width, settings.distance, **settings.search.kwargs())
        kind = settings.faiss.kind  # the index is saved beside the database's entry
        return knn_search_backend(
            q.cpu(),
            db.cpu(),
            width,
            settings.distance,
            backend=settings.backend,
            faiss_kind=kind,
            index_path=db_path / f"faiss-{kind}-{settings.distance}.index",
            **settings.faiss.params,
        )


def score_queries(
    search: Search,
    query_labels: LabelsLike,
    db_labels: LabelsLike,
    *,
    k: int,
    acc_ks: Sequence[int],
    metrics: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, np.ndarray]]:
    """(top-k distances, top-k indices, metric means as floats, per-query values): the one
    scoring path of image and text queries (`search_and_score`), whatever the queries are."""
    from cbmir.retrieval.scoring import search_and_score

    distances, indices, result = search_and_score(
        search, query_labels, db_labels, k=k, acc_ks=acc_ks, metrics=metrics
    )
    per_query = {name: np.asarray(v) for name, v in result.pop("per_query").items()}
    return distances, indices, {key: float(v) for key, v in result.items()}, per_query


def query_intervals(per_query: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """`ci95`: 95% bootstrap intervals over queries (1000 resamples, seed 0), the noise level.

    Empty below MIN_CI_QUERIES queries (e.g. the class queries of a two-class text run): the
    resampled means of a handful of values only span their range, which is no 95% interval.
    """
    n = min((len(np.asarray(v).reshape(-1)) for v in per_query.values()), default=0)
    if n < MIN_CI_QUERIES:
        return {}
    return {name: list(ci) for name, ci in bootstrap_cis(per_query).items()}


def publish_results(
    output_dir: Path,
    metrics: dict[str, Any],
    per_query: Mapping[str, np.ndarray],
    neighbours: Mapping[str, np.ndarray],
    trainer: L.Trainer | None,
) -> None:
    """Write `neighbors.npz`, `per_query.npz` and `metrics.json` (last: the summary that the
    report reads) and log the numeric metrics to every logger of the trainer."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_npz(output_dir / "neighbors.npz", **neighbours)
    write_npz(output_dir / "per_query.npz", **per_query)
    write_json(output_dir / "metrics.json", metrics)
    if trainer is None:
        return
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    for logger in trainer.loggers:
        logger.log_metrics(numeric)
        logger.save()


def _as_tensor(array: np.ndarray, device: str) -> torch.Tensor:
    """Wrap a read-only memory map without copying it (the search never writes to it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(array)).to(device)
