"""Embed queries the way the benchmark embedded the database, then search it exactly."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cbmir.config import numeric_precision
from cbmir.embedding import FrozenEmbedder, embed_items
from cbmir.errors import EmbeddingError
from cbmir.retrieval.settings import resolve_device


def embed_queries(
    embedder: FrozenEmbedder,
    images: Sequence[torch.Tensor],
    cfg: DictConfig,
    device: str = "auto",
    batch_size: int = 64,
) -> np.ndarray:
    """uint8 items (all of the database's item shape) -> float32 [Q, D] embeddings.

    The benchmark's own module (`FrozenEmbedder`: preprocessing, volume slicing) through
    `Trainer.predict` under the run's precision, as in its predict run (`embed_items`).
    """
    precision = OmegaConf.select(cfg, "trainer.precision", default="32-true")
    device = resolve_device(device, "--device")
    embeddings = embed_items(embedder, images, precision, device, batch_size)
    if not np.isfinite(embeddings).all():
        raise EmbeddingError("a query embedding holds NaN or Inf; no neighbours computed")
    return embeddings


#: relative L2 error allowed between a re-embedded database row and its stored embedding
TOLERANCE = {"exact": 1e-3, "mixed": 5e-2}


def check_reproduces(
    embedder: FrozenEmbedder,
    item: torch.Tensor,
    stored: np.ndarray,
    cfg: DictConfig,
    device: str = "auto",
) -> float:
    """Re-embed one database item and compare it with its stored row; returns the error.

    Identities cannot tell two random initialisations (or an edited checkpoint) apart; this
    can. An error beyond `TOLERANCE` means the queries would be embedded by another function
    than the database was, so no neighbour would mean anything.
    """
    fresh = embed_queries(embedder, [item], cfg, device)[0].astype(np.float64)
    stored = np.asarray(stored, dtype=np.float64)
    error = float(np.linalg.norm(fresh - stored) / max(np.linalg.norm(stored), 1e-12))
    precision = OmegaConf.select(cfg, "trainer.precision", default="32-true")
    exact = numeric_precision(precision) in (None, "64-true")
    limit = TOLERANCE["exact" if exact else "mixed"]
    if not error <= limit:
        raise EmbeddingError(
            f"the rebuilt extractor does not reproduce the stored embeddings: database row 0 "
            f"differs from its stored vector by {error:.2%} (allowed {limit:.1%}). Its weights "
            "are not the run's: random weights (model.pretrained=false) come from the run's "
            "seed, and a checkpoint file may have changed since."
        )
    return error


def search(
    query_embeddings: np.ndarray, database_embeddings: np.ndarray, k: int, distance: str
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN (ties to the lower row), on the CPU: a few queries need no GPU."""
    from cbmir.retrieval import knn_search

    with warnings.catch_warnings():  # read-only memmap: never written
        warnings.simplefilter("ignore", UserWarning)
        database = torch.from_numpy(np.asarray(database_embeddings))
    if query_embeddings.shape[1] != database.shape[1]:
        raise EmbeddingError(
            f"queries embed to {query_embeddings.shape[1]} dimensions but the database holds "
            f"{database.shape[1]}: it was built from inputs of another shape"
        )
    distances, indices = knn_search(torch.from_numpy(query_embeddings), database, k, distance)
    return distances.numpy(), indices.numpy()
