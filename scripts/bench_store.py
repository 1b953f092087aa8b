"""Store reads against the search they feed: opening cached embeddings must cost far less.

Writes one PathMNIST-size entry (90k x 2048 float32, 737 MB) through the real store writer,
drops it from the page cache where the OS allows, then times `store.load` (memory map, no
parsing), a full read of every row, and `knn_search` of 7,180 queries against it.

    python scripts/bench_store.py --rows 89996 --dim 2048 --queries 7180
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cbmir.retrieval import knn_search
from cbmir.store import EmbeddingStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=89996)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=7180)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore(Path(tmp))
        writer = store.open_writer("db", args.rows, args.dim, np.zeros((args.rows, 1)), {})
        for start in range(0, args.rows, 8192):
            rows = np.arange(start, min(start + 8192, args.rows))
            writer.write(rows, rng.standard_normal((len(rows), args.dim), dtype=np.float32))
        writer.commit()
        path = store.entry_dir("db") / "embeddings.npy"
        with open(path, "rb") as handle:  # evict from the page cache (Linux), best effort
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        entry = store.load("db")
        opened = time.perf_counter() - started
        started = time.perf_counter()
        total = float(np.asarray(entry.embeddings).sum(dtype=np.float64))
        read = time.perf_counter() - started
        queries = torch.from_numpy(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
        database = torch.from_numpy(np.asarray(entry.embeddings))
        started = time.perf_counter()
        knn_search(queries, database, 5)
        search = time.perf_counter() - started
        size_gb = path.stat().st_size / 1e9
        print(f"entry {args.rows} x {args.dim} float32 ({size_gb:.2f} GB), checksum {total:.1f}")
        print(f"store.load (memory map): {opened * 1e3:.1f} ms")
        print(f"read every row from disk: {read:.2f} s")
        print(f"knn_search {args.queries} queries: {search:.2f} s")
        print(f"(load + full read) / search = {(opened + read) / search:.3f}")


if __name__ == "__main__":
    main()
