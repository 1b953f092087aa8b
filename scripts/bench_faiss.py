"""Benchmark exact search against faiss IVF / HNSW on synthetic clustered vectors (issue 7).

Ground truth is the certified exact `knn_search` (torch). For each method: build time,
search time, speed-up of the search over exact faiss flat, and recall@k against the truth
(mean over queries of |found & true top-k| / k).

    python scripts/bench_faiss.py --database 1000000 --dim 512 --queries 10000 --k 5
    python scripts/bench_faiss.py --database 50000 --queries 1000   # quick run
    python scripts/bench_faiss.py --exact-only --rounds 2   # torch vs faiss flat, alternating
    python scripts/bench_faiss.py --tile-rows 1024 8192 --rounds 3   # faiss' database tile
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import time

import numpy as np
import torch

from cbmir.retrieval import faiss_backend as fb
from cbmir.retrieval import knn_search


def clustered(n: int, dim: int, centers: np.ndarray, noise: float, rng) -> np.ndarray:
    """Points around random cluster centres, generated in chunks to bound temporary memory."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        assign = rng.integers(0, centers.shape[0], stop - start)
        out[start:stop] = centers[assign]
        out[start:stop] += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out


class CountPasses(logging.Handler):
    """Collects knn_search's debug lines: how many queries its certificate sent to pass 2."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> CountPasses:
        logger = logging.getLogger("cbmir.retrieval.search")
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("cbmir.retrieval.search")
        logger.removeHandler(self)
        logger.setLevel(self._level)

    def summary(self) -> str:
        return "; ".join(self.lines) or "every query certified by pass 1, no float64 ordering"


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    k = truth.shape[1]
    hits = (found[:, :, None] == truth[:, None, :]).any(dim=2).sum(dim=1)
    return float(hits.float().mean() / k)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name:")),
        "unknown",
    )


def compare_tiles(faiss, q: np.ndarray, x: np.ndarray, tiles: list[int], rounds: int) -> None:
    """knn_search's faiss pass 1 (`knn_L2sqr` with the 21-row shortlist of k=5 and float32
    ||x||^2 given) timed with each database tile in turn, `rounds` times: wall and CPU s."""
    m, ptr = 21, faiss.swig_ptr
    sqn = np.einsum("ij,ij->i", x, x).astype(np.float32)
    scores, idx = np.empty((len(q), m), np.float32), np.empty((len(q), m), np.int64)
    before = faiss.cvar.distance_compute_blas_database_bs
    wall: dict[int, list[float]] = {t: [] for t in tiles}
    cpu: dict[int, list[float]] = {t: [] for t in tiles}
    try:
        for _ in range(rounds):
            for tile in tiles:
                faiss.cvar.distance_compute_blas_database_bs = tile
                c0, t0 = time.process_time(), time.perf_counter()
                faiss.knn_L2sqr(
                    ptr(q), ptr(x), x.shape[1], len(q), len(x), m, ptr(scores), ptr(idx), ptr(sqn)
                )
                wall[tile].append(time.perf_counter() - t0)
                cpu[tile].append(time.process_time() - c0)
    finally:
        faiss.cvar.distance_compute_blas_database_bs = before
    query_tile = faiss.cvar.distance_compute_blas_query_bs
    for tile in tiles:
        print(
            f"faiss knn_L2sqr, {query_tile}-query x {tile}-row tiles: wall s "
            f"{', '.join(f'{t:.1f}' for t in wall[tile])}; process CPU s "
            f"{', '.join(f'{t:.1f}' for t in cpu[tile])}"
        )
    print(f"load average at end {os.getloadavg()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.0, help="within-cluster std (centres: 1)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    p.add_argument("--no-hnsw", action="store_true")
    p.add_argument("--exact-only", action="store_true", help="only torch vs faiss flat")
    p.add_argument("--rounds", type=int, default=1, help="alternating exact rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tile-rows",
        type=int,
        nargs="+",
        default=None,
        help="only time knn_search's faiss pass 1 (knn_L2sqr, 21-row shortlist) with these "
        "database tiles (faiss' distance_compute_blas_database_bs), alternating",
    )
    p.add_argument(
        "--pass1",
        choices=["auto", "torch", "faiss"],
        default="auto",
        help="knn_search's pass 1 (auto: faiss from FAISS_MIN_ROWS database rows)",
    )
    args = p.parse_args()

    import faiss

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, faiss {faiss.__version__} with "
        f"{faiss.omp_get_max_threads()} threads, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()}"
    )
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    x = clustered(args.database, args.dim, centers, args.noise, rng)
    q = clustered(args.queries, args.dim, centers, args.noise, rng)
    k = args.k
    print(
        f"data: {args.database} database x {args.dim} dims, {args.queries} queries, k={k}, "
        f"{args.clusters} clusters, noise {args.noise}"
    )

    if args.tile_rows:
        compare_tiles(faiss, q, x, args.tile_rows, args.rounds)
        return

    t0 = time.perf_counter()
    flat = fb.build_index(x, "flat")
    flat_build = time.perf_counter() - t0
    torch_times, flat_times, flat_cpu, torch_cpu = [], [], [], []
    for _ in range(args.rounds):  # side by side, alternating, same data
        c0, t0 = time.process_time(), time.perf_counter()
        with CountPasses() as passes:
            _, truth = knn_search(q, x, k, pass1=args.pass1)
        torch_times.append(time.perf_counter() - t0)
        torch_cpu.append(time.process_time() - c0)
        c0, t0 = time.process_time(), time.perf_counter()
        found = fb.search(flat, q, k)[1]
        flat_times.append(time.perf_counter() - t0)
        flat_cpu.append(time.process_time() - c0)
    exact_torch, flat_search = min(torch_times), min(flat_times)
    print(
        f"knn_search pass1={args.pass1} (exact, certified): search {exact_torch:.1f} s (rounds: "
        f"{', '.join(f'{t:.1f}' for t in torch_times)}; process CPU s: "
        f"{', '.join(f'{t:.1f}' for t in torch_cpu)}); certificate: {passes.summary()}"
    )
    print(
        f"faiss flat (exact): search {flat_search:.1f} s (rounds: "
        f"{', '.join(f'{t:.1f}' for t in flat_times)}; process CPU s: "
        f"{', '.join(f'{t:.1f}' for t in flat_cpu)})"
    )
    same = int((found == truth).all(dim=1).sum())
    print(
        f"exact: knn_search / faiss flat search time = {exact_torch / flat_search:.3f}; "
        f"neighbours equal on {same}/{args.queries} queries (faiss breaks ties its own way)"
    )
    rows = [("faiss flat (exact)", flat_build, flat_search, recall(found, truth))]
    del flat
    if args.exact_only:
        print(f"load average at end {os.getloadavg()}")
        return

    t0 = time.perf_counter()
    ivf = fb.build_index(x, "ivf", nlist=args.nlist)
    build = time.perf_counter() - t0
    inv = faiss.extract_index_ivf(ivf)
    nlist = inv.nlist
    sizes = np.array([inv.invlists.list_size(i) for i in range(nlist)])
    print(
        f"IVF{nlist} list sizes: min {sizes.min()}, median {int(np.median(sizes))}, "
        f"max {sizes.max()}; largest 1% of lists hold "
        f"{np.sort(sizes)[-max(1, nlist // 100) :].sum() / sizes.sum():.1%} of the vectors"
    )
    for nprobe in args.nprobe:
        fb.set_search_params(ivf, nprobe=nprobe)
        t0 = time.perf_counter()
        found = fb.search(ivf, q, k)[1]
        rows.append(
            (
                f"faiss IVF{nlist},Flat nprobe={nprobe}",
                build,
                time.perf_counter() - t0,
                recall(found, truth),
            )
        )
    del ivf

    if not args.no_hnsw:
        t0 = time.perf_counter()
        hnsw = fb.build_index(x, "hnsw", M=args.hnsw_m, ef_construction=args.ef_construction)
        build = time.perf_counter() - t0
        for ef in args.ef_search:
            fb.set_search_params(hnsw, ef_search=ef)
            t0 = time.perf_counter()
            found = fb.search(hnsw, q, k)[1]
            rows.append(
                (
                    f"faiss HNSW{args.hnsw_m} efC={args.ef_construction} efSearch={ef}",
                    build,
                    time.perf_counter() - t0,
                    recall(found, truth),
                )
            )

    print(
        f"{'method':<44} {'build s':>9} {'search s':>9} {'x flat':>8} {'x torch':>8} "
        f"{'recall@' + str(k):>9}"
    )
    for name, build, search, rec in rows:
        print(
            f"{name:<44} {build:>9.2f} {search:>9.2f} {flat_search / search:>8.1f} "
            f"{exact_torch / search:>8.1f} {rec:>9.4f}"
        )
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
