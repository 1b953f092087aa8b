"""On-disk embedding store, keyed by everything that changes an embedding.

An entry is a directory `<root>/<key>/` holding `embeddings.npy` (float32 [N, D]),
`labels.npy` and `manifest.json`. Entries are written into a temporary directory and renamed
into place only once complete and checked, so an interrupted run never leaves an entry that a
later run would trust. The writing process holds a lock on its temporary directory
(`cbmir.io_utils.owned_tempdir`); one left by a killed run has no live holder and is removed
by the next run (`EmbeddingStore.remove_stale_temps`), a concurrent run's is left alone.
`embeddings.npy` is read memory-mapped: a new distance or k costs a file open, not a
re-embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from cbmir.errors import CbmirError, EmbeddingError
from cbmir.io_utils import owned_tempdir, release, remove_stale

log = logging.getLogger(__name__)

#: bump when the meaning of stored embeddings changes (invalidates every old entry)
STORE_FORMAT = 1
MANIFEST = "manifest.json"
#: prefix of an entry being written: `.tmp-<key>-<random>`
TEMP_PREFIX = ".tmp-"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def make_key(extractor: dict[str, Any], data: dict[str, Any], **extra: Any) -> str:
    """Content key of an embedding set: extractor + weights, data + split, preprocessing."""
    payload = {"format": STORE_FORMAT, "extractor": extractor, "data": data, **extra}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class StoredEmbeddings:
    """A finished entry: embeddings are a read-only memory map."""

    path: Path
    embeddings: np.ndarray
    labels: np.ndarray
    manifest: dict[str, Any]


class EmbeddingStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        entry = self.entry_dir(key)
        return (entry / MANIFEST).is_file() and (entry / "embeddings.npy").is_file()

    def load(self, key: str) -> StoredEmbeddings:
        entry = self.entry_dir(key)
        if not self.has(key):
            raise CbmirError(f"no finished embeddings for key {key} under {self.root}")
        manifest = json.loads((entry / MANIFEST).read_text())
        embeddings = np.load(entry / "embeddings.npy", mmap_mode="r")
        labels = np.load(entry / "labels.npy")
        if embeddings.shape != tuple(manifest["shape"]):
            raise CbmirError(
                f"store entry {entry} is inconsistent (embeddings {embeddings.shape}, "
                f"manifest {manifest['shape']}); delete the directory to re-embed"
            )
        return StoredEmbeddings(entry, embeddings, labels, manifest)

    def open_writer(
        self, key: str, n_rows: int, dim: int, labels: np.ndarray, meta: dict[str, Any]
    ) -> EntryWriter:
        return EntryWriter(self, key, n_rows, dim, labels, meta)

    def remove_stale_temps(self) -> list[Path]:
        """Delete the temporary entries of runs that died while writing (their writer's lock
        is gone); those of live runs, in this process or another, stay."""
        if not self.root.is_dir():
            return []
        removed = remove_stale(sorted(self.root.glob(f"{TEMP_PREFIX}*")))
        if removed:
            log.info("removed %d unfinished store entries left by killed runs", len(removed))
        return removed


def checked_batch(rows: np.ndarray, values: np.ndarray, dim: int) -> np.ndarray:
    """One batch of embeddings as float32 [B, dim], refused when its shape is wrong or a row is
    NaN / Inf (every writer checks before anything reaches an entry)."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != dim:
        raise EmbeddingError(
            f"extractor returned embeddings of shape {values.shape}; expected [batch, {dim}]"
        )
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise EmbeddingError(
            f"{int(bad.sum())} of {len(values)} embeddings in a batch are NaN or Inf "
            f"(first dataset rows: {np.asarray(rows)[bad][:5].tolist()}); the extractor is "
            "numerically unstable here (try trainer.precision=32-true) — no metrics are computed"
        )
    return values


class EntryWriter:
    """Fills one entry batch by batch, then publishes it atomically (or throws it away)."""

    def __init__(
        self,
        store: EmbeddingStore,
        key: str,
        n_rows: int,
        dim: int,
        labels: np.ndarray,
        meta: dict[str, Any],
    ) -> None:
        if len(labels) != n_rows:
            raise ValueError(f"{len(labels)} labels for {n_rows} rows")
        self.store, self.key, self.meta, self.dim = store, key, meta, int(dim)
        # locked while this writer lives: `remove_stale_temps` of another run keeps it
        self.tmp, self._lock = owned_tempdir(store.root, prefix=f"{TEMP_PREFIX}{key}-")
        self.array = open_memmap(
            self.tmp / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n_rows, dim)
        )
        np.save(self.tmp / "labels.npy", np.asarray(labels))
        self.written = np.zeros(n_rows, dtype=bool)
        self.started = time.perf_counter()

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        values = checked_batch(rows, values, self.array.shape[1])
        self.array[rows] = values
        self.written[rows] = True

    @property
    def complete(self) -> bool:
        """True once every row has been written."""
        return bool(self.written.all())

    def commit(self) -> Path:
        missing = int((~self.written).sum())
        if missing:
            raise EmbeddingError(f"{missing} rows were never embedded; the entry is discarded")
        self.array.flush()
        del self.array
        manifest = {
            **self.meta,
            "key": self.key,
            "shape": [len(self.written), self.dim],
            "embed_seconds": self.meta.get("embed_seconds", time.perf_counter() - self.started),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "format": STORE_FORMAT,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        final = self.store.entry_dir(self.key)
        try:
            os.rename(self.tmp, final)
        except OSError:
            if not self.store.has(self.key):
                raise
            # another job published the same entry first: identical content, keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            release(self._lock)
            self._lock = None
        return final

    def abort(self) -> None:
        if hasattr(self, "array"):
            del self.array
        shutil.rmtree(self.tmp, ignore_errors=True)
        release(self._lock)
        self._lock = None
