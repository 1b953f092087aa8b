"""Optional faiss indexes (flat, IVF, HNSW) behind the same convention as `knn_search`.

Results are (distances float32 [Q, k], indices int64 [Q, k]) torch tensors on the CPU, sorted
ascending with ties to the lower index. Euclidean distances are sqrt of faiss' squared L2;
cosine uses inner product on L2-normalised vectors and returns 1 - similarity. Slots an
approximate index could not fill have index -1 and distance inf. IVF and HNSW are approximate
(recall < 1): use them only when exact search is too slow (millions of database rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbmir.errors import CbmirError, ConfigError
from cbmir.io_utils import write_json
from cbmir.retrieval.search import _as_matrix, check_finite, knn_search
from cbmir.retrieval.settings import (
    FAISS_SEARCH_PARAMS,
    check_backend,
    check_distance,
    check_faiss,
    check_k,
)

log = logging.getLogger(__name__)


def require_faiss() -> Any:
    """The faiss module, or a CbmirError saying how to install it (an optional dependency)."""
    try:
        import faiss
    except ImportError as err:
        raise CbmirError(
            "the faiss backend needs faiss: pip install faiss-cpu (or the cbmir[faiss] extra)"
        ) from err
    return faiss


def _prepare(data: np.ndarray | torch.Tensor, name: str, cosine: bool) -> np.ndarray:
    """float32 C-contiguous numpy rows; L2-normalised for cosine (zero rows stay zero)."""
    t = _as_matrix(data, name)
    check_finite(t, name)
    arr = np.ascontiguousarray(t.cpu().numpy(), dtype=np.float32)
    if cosine:
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        arr = arr / np.maximum(norms, np.float32(1e-30))
    return arr


def build_index(
    database: np.ndarray | torch.Tensor,
    kind: str = "flat",
    distance: str = "euclidean",
    **params: Any,
) -> Any:
    """Build a faiss index over the database rows.

    kind "flat": exact. "ivf": inverted lists, params nlist (default 4 sqrt(N)), train_size
    (default 64 * nlist rows sampled for k-means), seed, nprobe (default 16). "hnsw": graph,
    params M (32), ef_construction (80), ef_search (64).
    """
    faiss = require_faiss()
    check_distance(distance)
    check_faiss(kind, params)
    x = _prepare(database, "database", distance == "cosine")
    n, dim = x.shape
    metric = faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        index = faiss.index_factory(dim, "Flat", metric)
    elif kind == "ivf":
        # faiss' guidance is 4-16 sqrt(N) lists; sqrt(N) made lists so long that IVF barely
        # beat flat (docs/benchmarks.md). At least 39 training rows per list.
        nlist = int(params.get("nlist") or max(1, min(int(4 * math.sqrt(n)), n // 39)))
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", metric)
        train_size = min(n, int(params.get("train_size") or 64 * nlist))
        rng = np.random.default_rng(params.get("seed", 0))
        sample = x if train_size >= n else x[np.sort(rng.choice(n, train_size, replace=False))]
        index.train(sample)
    else:
        index = faiss.index_factory(dim, f"HNSW{int(params.get('M', 32))},Flat", metric)
        index.hnsw.efConstruction = int(params.get("ef_construction", 80))
    index.add(x)
    set_search_params(index, **{k: v for k, v in params.items() if k in FAISS_SEARCH_PARAMS})
    return index


def set_search_params(index: Any, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Recall/speed knobs: IVF nprobe (default 16), HNSW efSearch (default 64)."""
    faiss = require_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe or 16)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef_search or 64)


def search(
    index: Any, queries: np.ndarray | torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest database rows per query, in the `knn_search` convention (see module doc)."""
    faiss = require_faiss()
    cosine = index.metric_type == faiss.METRIC_INNER_PRODUCT
    q = _prepare(queries, "queries", cosine)
    if q.shape[1] != index.d:
        raise ConfigError(f"queries have dimension {q.shape[1]} but the index has {index.d}")
    k = check_k(k, n_database=index.ntotal)
    raw_d, raw_i = index.search(q, int(k))
    d = torch.from_numpy(raw_d.astype(np.float32))
    i = torch.from_numpy(raw_i.astype(np.int64))
    d = 1.0 - d if cosine else d.clamp_min(0).sqrt()
    missing = i < 0
    d = d.masked_fill(missing, math.inf)
    key_i = i.masked_fill(missing, index.ntotal)  # unfilled slots sort last
    order = key_i.argsort(dim=1)
    d, i = d.gather(1, order), i.gather(1, order)
    order = d.sort(dim=1, stable=True).indices
    return d.gather(1, order), i.gather(1, order)


def save_index(index: Any, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the index (and optional JSON metadata beside it) atomically: tmp file, os.replace."""
    faiss = require_faiss()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if meta is not None:
        write_json(_meta_path(path), meta)
    return path


def load_index(path: str | Path) -> Any:
    """Read an index written by `save_index`."""
    faiss = require_faiss()
    path = Path(path)
    if not path.is_file():
        raise CbmirError(f"no faiss index at {path}")
    return faiss.read_index(str(path))


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def database_fingerprint(database: np.ndarray) -> str:
    """blake2b of shape and bytes: a saved index is reused only for the very same vectors."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((database.shape, str(database.dtype))).encode())
    flat = np.ascontiguousarray(database).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, 2**26):
        h.update(flat[start : start + 2**26])
    return h.hexdigest()


def knn_search_backend(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor,
    k: int,
    distance: str = "euclidean",
    backend: str = "torch",
    faiss_kind: str = "flat",
    index_path: str | Path | None = None,
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`knn_search` (backend "torch", kw = its options) or a faiss index (kw = index params).

    With faiss and `index_path`, an index saved there for the same kind, distance, parameters
    and database (fingerprint) is reused; otherwise it is built and saved there.
    """
    if check_backend(backend) == "torch":
        return knn_search(queries, database, k, distance, **kw)
    check_distance(distance)
    db = np.ascontiguousarray(_as_matrix(database, "database").cpu().numpy(), dtype=np.float32)
    build_params = {key: v for key, v in kw.items() if key not in FAISS_SEARCH_PARAMS}
    meta = {
        "kind": faiss_kind,
        "distance": distance,
        "params": build_params,
        "shape": list(db.shape),
        "fingerprint": database_fingerprint(db) if index_path is not None else None,
    }
    index = None
    if index_path is not None and Path(index_path).is_file():
        meta_file = _meta_path(Path(index_path))
        saved = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        if saved == meta:
            index = load_index(index_path)
        else:
            log.warning(
                "faiss index at %s was built for other data or settings; rebuilding", index_path
            )
    if index is None:
        index = build_index(db, faiss_kind, distance, **build_params)
        if index_path is not None:
            save_index(index, index_path, meta)
    set_search_params(index, **{key: v for key, v in kw.items() if key in FAISS_SEARCH_PARAMS})
    return search(index, queries, k)
