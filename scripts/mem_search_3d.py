"""Peak memory of the exact k-NN search on 3D `concat`-sized embeddings.

AdrenalMNIST3D at 64 px with a 2048-d CNN: 298 test queries against 1,188 train rows of
64 x 2048 = 131,072 floats, read as float32 memory maps exactly as the retrieval stage reads the
store. The vectors are non-negative and low-rank plus noise (like pooled CNN features), not
real features. Prints the search time and the process's peak RSS before and after the search.

    python scripts/mem_search_3d.py
    python scripts/mem_search_3d.py --query-chunk 16
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from cbmir.retrieval import knn_search
from cbmir.retrieval.search import chunk_sizes


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def write_features(path: Path, n: int, basis: np.ndarray, rng: np.random.Generator) -> None:
    out = open_memmap(path, "w+", np.float32, (n, basis.shape[1]))
    for start in range(0, n, 128):
        m = min(128, n - start)
        coef = rng.standard_normal((m, basis.shape[0]), dtype=np.float32)
        out[start : start + m] = np.maximum(coef @ basis, 0) + 0.1 * rng.random(
            (m, basis.shape[1]), dtype=np.float32
        )
    out.flush()
    del out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64 * 2048)
    parser.add_argument("--queries", type=int, default=298)
    parser.add_argument("--database", type=int, default=1188)
    parser.add_argument("--query-chunk", type=int, default=None)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    basis = rng.standard_normal((32, args.dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        write_features(Path(tmp) / "q.npy", args.queries, basis, rng)
        write_features(Path(tmp) / "x.npy", args.database, basis, rng)
        del basis
        with warnings.catch_warnings():  # read-only memory maps: the search never writes
            warnings.simplefilter("ignore", UserWarning)
            q = torch.from_numpy(np.load(Path(tmp) / "q.npy", mmap_mode="r"))
            x = torch.from_numpy(np.load(Path(tmp) / "x.npy", mmap_mode="r"))
        before = peak_mb()
        started = time.perf_counter()
        knn_search(q, x, 5, query_chunk=args.query_chunk)
        seconds = time.perf_counter() - started
    chunks = chunk_sizes(args.queries, args.database, args.query_chunk)
    print(
        f"D={args.dim} queries={args.queries} database={args.database} "
        f"[query_chunk, db_chunk]={list(chunks)}: search {seconds:.1f}s, peak RSS "
        f"{peak_mb():.0f} MB (before the search {before:.0f} MB; embeddings "
        f"{(args.queries + args.database) * args.dim * 4 / 1e6:.0f} MB on disk)"
    )


if __name__ == "__main__":
    main()
