"""Text-to-image retrieval (`retrieval.query=text`): one text query per class.

Each class's query is built from prompt templates x the class's name (or its descriptions in
`retrieval.prompts.classes`); the text tower embeds every prompt once, and the class query is the
CLIP-practice ensemble: normalise each prompt's vector, average, renormalise. The database split's
image embeddings come from the store (embedded once through the normal path if missing). Search
is by cosine similarity (the space the towers were trained in), whatever `retrieval.distance`
says. Scoring and the files are those of image queries (`score_queries`, `publish_results`:
the configured `retrieval.metrics`, `per_query.npz`, `ci95`), with the class as the query's
label, so a class prompt's R is its class's database count; zero-shot classification of every
database image against the class queries comes for free.

Docs: docs/text.md.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from cbmir.errors import DataError
from cbmir.retrieval.callback import (
    ScoringCallback,
    publish_results,
    query_intervals,
    score_queries,
)
from cbmir.retrieval.metric_names import PAPER_METRICS, check_metrics
from cbmir.retrieval.settings import PromptSettings
from cbmir.store import EmbeddingStore

log = logging.getLogger(__name__)

#: the distance text queries are searched with (CLIP's training objective)
TEXT_DISTANCE = "cosine"


def dataset_prompts(retrieval: Mapping[str, Any], datamodule: Any) -> dict[int, list[str]]:
    """The class prompts of a prepared datamodule (its `label_names`), checked before any
    weights load: a dataset without class names is a clear error."""
    names = dict(getattr(datamodule, "label_names", None) or {})
    if not names:
        raise DataError(
            f"{getattr(datamodule, 'name', 'the data')} has no class names to build text "
            "queries from; set data.label_names or retrieval.prompts.classes"
        )
    return PromptSettings.from_config(retrieval.get("prompts")).class_prompts(names)


def class_queries(encoder: Any, prompts: Mapping[int, Sequence[str]]) -> torch.Tensor:
    """[C, D] class vectors: each prompt embedded once (one batch), normalised, averaged per
    class, renormalised (the CLIP prompt ensemble)."""
    flat = [p for cid in prompts for p in prompts[cid]]
    vectors = F.normalize(encoder.encode_text(flat).float(), dim=-1)
    sizes = [len(prompts[cid]) for cid in prompts]
    return F.normalize(torch.stack([v.mean(dim=0) for v in vectors.split(sizes)]), dim=-1)


def query_labels(class_ids: Sequence[int], database_labels: np.ndarray) -> np.ndarray:
    """Each class query's label in the database's format: its id, or a one-hot row for N x L
    multi-label data (relevant: the image has that label)."""
    labels = np.asarray(database_labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        rows = np.zeros((len(class_ids), labels.shape[1]), dtype=labels.dtype)
        rows[np.arange(len(class_ids)), list(class_ids)] = 1
        return rows
    return np.asarray(class_ids, dtype=np.int64).reshape(-1, 1)


def zero_shot(
    scores: torch.Tensor, class_ids: Sequence[int], database_labels: np.ndarray
) -> dict[str, float | None]:
    """Accuracy and balanced accuracy of labelling every database image with its most similar
    class query (single-label data; None for multi-label, where one class per image is wrong)."""
    labels = np.asarray(database_labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return {"zero_shot_acc": None, "zero_shot_balanced_acc": None}
    truth = labels.reshape(-1).astype(np.int64)
    predicted = np.asarray(class_ids)[scores.argmax(dim=1).cpu().numpy()]
    recalls = [float((predicted[truth == c] == c).mean()) for c in np.unique(truth)]
    return {
        "zero_shot_acc": float((predicted == truth).mean()),
        "zero_shot_balanced_acc": float(np.mean(recalls)),
    }


def class_similarity(class_vectors: torch.Tensor, database: np.ndarray) -> torch.Tensor:
    """[N, C] cosine similarity of every database image to every class (or sentence) vector."""
    with warnings.catch_warnings():  # a read-only memory map, never written to
        warnings.simplefilter("ignore", UserWarning)
        db = F.normalize(torch.as_tensor(np.asarray(database)).float(), dim=-1)
    if db.shape[1] != class_vectors.shape[1]:
        raise DataError(
            f"text vectors have {class_vectors.shape[1]} dimensions but the stored image "
            f"embeddings {db.shape[1]}: the store entry is not from this model's shared space"
        )
    return db @ class_vectors.float().T  # the text vectors are normalised (TextEncoder)


def nearest(similarity: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine distances, indices) [Q, width] of each row of a [Q, N] similarity: most similar
    first, ties to the lower database index, so the first k of a wider list are the top k (the
    R-metric search asks for more than k, `metric_set.r_search`)."""
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :width]
    return 1.0 - similarity.gather(1, order), order


class TextRetrievalCallback(ScoringCallback):
    """Runs the class text queries against the database split once its embeddings exist."""

    def __init__(
        self,
        store: EmbeddingStore,
        database_key: str,
        output_dir: str | Path,
        model_cfg: Mapping[str, Any] | None,
        prompts: Mapping[int, Sequence[str]],
        label_names: Mapping[int, str],
        k: int,
        acc_ks: Sequence[int],
        embedded_now: Sequence[str] = (),
        data_facts: Mapping[str, Any] | None = None,
        encoder: Any = None,
        metrics: Sequence[str] | str = PAPER_METRICS,
    ) -> None:
        """`encoder`: the text tower, built already (the pipeline builds it with the image
        extractor, so a missing tokenizer stops the job before the embedding); else it is
        built from `model_cfg` when the search runs."""
        self.encoder = encoder
        self.store, self.database_key = store, database_key
        self.output_dir = Path(output_dir)
        self.model_cfg = dict(model_cfg or {})
        self.prompts = {int(c): list(p) for c, p in prompts.items()}
        self.label_names = dict(label_names)
        self.k, self.acc_ks = int(k), tuple(acc_ks)
        self.embedded_now = list(embedded_now)
        self.data_facts = dict(data_facts or {})
        self.metric_names = check_metrics(metrics)  # `retrieval.metrics`, as for image queries

    def evaluate(self, trainer: L.Trainer | None = None) -> dict[str, Any]:
        from cbmir.extractors.text import build_text_encoder

        database = self.store.load(self.database_key)
        started = time.perf_counter()
        encoder = self.encoder if self.encoder is not None else build_text_encoder(self.model_cfg)
        similarity = class_similarity(class_queries(encoder, self.prompts), database.embeddings)
        class_ids = list(self.prompts)
        db_labels = np.asarray(database.labels)
        labels = query_labels(class_ids, db_labels)
        by_class = similarity.T.contiguous()  # [C, N]
        distances, indices, metrics, self.per_query = score_queries(
            lambda rows, width: nearest(by_class[rows], width),
            labels,
            db_labels,
            k=self.k,
            acc_ks=self.acc_ks,
            metrics=self.metric_names,
        )
        names = [self.label_names.get(c, str(c)) for c in class_ids]
        metrics["per_class"] = {
            name: {m: float(v[i]) for m, v in self.per_query.items()}
            for i, name in enumerate(names)
        }
        metrics.update(zero_shot(similarity, class_ids, db_labels))
        metrics.update(
            query="text",
            n_queries=len(class_ids),
            n_database=int(len(db_labels)),
            k=self.k,
            distance=TEXT_DISTANCE,
            backend="torch",
            search_seconds=time.perf_counter() - started,
            embed_seconds=float(database.manifest.get("embed_seconds", 0.0)),
            # over the class queries: few, so wide and weak; none below MIN_CI_QUERIES classes
            ci95=query_intervals(self.per_query),
            embedded_now=self.embedded_now,
            database_entry=str(database.path),
            prompts={name: self.prompts[c] for name, c in zip(names, class_ids, strict=True)},
            text_tower=encoder.text_identity(),
            **self.data_facts,
        )
        neighbours = {
            "indices": indices.cpu().numpy(),
            "distances": distances.cpu().numpy(),
            "query_labels": labels,
            "query_texts": np.asarray(names),
        }
        publish_results(self.output_dir, metrics, self.per_query, neighbours, trainer)
        summary = ", ".join(f"{n}={metrics[n]:.4f}" for n in metrics if "@" in n)
        log.info(
            "text retrieval: %s, zero-shot acc %s (%d class queries, %d database)",
            summary,
            metrics.get("zero_shot_acc"),
            metrics["n_queries"],
            metrics["n_database"],
        )
        self.metrics = metrics
        return metrics
