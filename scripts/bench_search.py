"""Benchmark exact k-NN retrieval against a plain GEMM + topk and a per-query loop (issue 7).

Measured side by side in one process on the same random float32 data:

  (a)  plain ``q @ x.T`` + ``topk(k)`` over the full Q x N matrix (the speed floor; its
       ranking is by inner product, so it is not a neighbour reference);
  (a2) the same single GEMM ranking by ``||x||^2 - 2 q.x`` (one full-size addmm + topk): the
       one-shot distance ranking, used to compare neighbours on every query;
  (a3) (a) with the product in numpy (its BLAS, OpenBLAS in the wheels; CPU only), which
       `knn_search` uses on non-Intel CPUs: the floor with the faster BLAS;
  (b)  ``knn_search`` + ``compute_retrieval_metrics`` (random labels), the code under test;
  (c)  a per-query numpy loop (distance to every database vector, full stable argsort) on
       --loop-queries queries, extrapolated linearly to all queries.

Peak extra memory of (b) is measured in a fresh subprocess that loads the inputs from .npy,
resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5), runs (b) and reports
VmHWM - VmRSS-before (falls back to the ru_maxrss delta where clear_refs is not allowed).
Wall times are reported as the best of --repeats rounds, with every round and the process CPU
time beside them, plus the load average: on a shared machine other processes inflate wall time.

    python scripts/bench_search.py --queries 7180 --database 89996 --dim 1024 --k 5
    python scripts/bench_search.py --data pixels --queries 800 --database 4000 --dim 12288
    python scripts/bench_search.py --data concat3d --queries 298 --database 1188 --dim 131072

--data: ``gaussian`` (default) standard normal; ``pixels``: `model=pixels` embeddings of
synthetic RGB images (``cbmir.data.synthetic``, bloodmnist look, dim = 3 * size^2, values in
[0, 1]: norms far larger than neighbour gaps, the hard case for a GEMM-based search);
``concat3d``: non-negative low-rank + noise rows like slice-concatenated 3D CNN features.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cbmir.retrieval import compute_retrieval_metrics, knn_search

GB = 10**9


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_b(q, x, ql, dl, k: int, **kw) -> tuple[float, float, dict, torch.Tensor]:
    _sync(q.device)
    t0 = time.perf_counter()
    _, idx = knn_search(q, x, k, **kw)  # returns CPU tensors: includes the sync
    t1 = time.perf_counter()
    metrics = compute_retrieval_metrics(idx, ql, dl, map_k=k, acc_ks=(1, 3, 5), mmv_k=k)
    t2 = time.perf_counter()
    return t2 - t0, t1 - t0, metrics, idx


def child_memory(data_dir: Path, k: int) -> None:
    """Subprocess body: inputs loaded, peak counter reset, then (b); prints JSON."""
    q = torch.from_numpy(np.load(data_dir / "q.npy"))
    x = torch.from_numpy(np.load(data_dir / "x.npy"))
    ql, dl = np.load(data_dir / "ql.npy"), np.load(data_dir / "dl.npy")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after (b) - VmRSS before (b), peak counter reset via /proc/self/clear_refs"
        rss_before = _proc_status_kib("VmRSS")
    except OSError:
        method = "ru_maxrss after (b) - ru_maxrss before (b) (clear_refs not permitted)"
        rss_before = maxrss_before
    seconds, _, _, _ = _run_b(q, x, ql, dl, k)
    if method.startswith("VmHWM"):
        peak = _proc_status_kib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "extra_kib": peak - rss_before,
                "rss_before_kib": rss_before,
                "peak_kib": peak,
                "method": method,
                "seconds": seconds,
            }
        )
    )


def measure_memory(q, x, ql, dl, k: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for name, arr in (("q", q.numpy()), ("x", x.numpy()), ("ql", ql), ("dl", dl)):
            np.save(tmp_path / f"{name}.npy", arr)
        out = subprocess.run(
            [sys.executable, __file__, "--child-memory", tmp, "--k", str(k)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def loop_baseline(q: np.ndarray, x: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """Per query: Euclidean distance to every database vector, full stable argsort."""
    out = np.empty((q.shape[0], k), dtype=np.int64)
    t0 = time.perf_counter()
    for j in range(q.shape[0]):
        dist = np.sqrt(((x - q[j]) ** 2).sum(axis=1))
        out[j] = np.argsort(dist, kind="stable")[:k]
    return time.perf_counter() - t0, out


def pixel_rows(n: int, dim: int, split: int) -> torch.Tensor:
    """`model=pixels` embeddings of synthetic RGB images, dim = 3 * size^2."""
    from cbmir.data.synthetic import synthetic_images, synthetic_labels

    size = int(round(math.sqrt(dim / 3)))
    if 3 * size * size != dim:
        raise SystemExit(f"--data pixels needs dim = 3 * size^2 (e.g. 12288 for 64 px), got {dim}")
    labels = synthetic_labels("bloodmnist", n, np.random.default_rng(split))
    blocks = synthetic_images("bloodmnist", size, labels, seed=0, split_id=split)
    rows = np.concatenate([b.reshape(len(b), -1).astype(np.float32) for b in blocks])
    return torch.from_numpy(rows / np.float32(255))


def concat3d_rows(n: int, dim: int, basis: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Non-negative low-rank + noise rows (like scripts/mem_search_3d.py), 256 at a time."""
    out = torch.empty(n, dim)
    for start in range(0, n, 256):
        rows = min(256, n - start)
        coef = torch.randn(rows, basis.shape[0], generator=g)
        out[start : start + rows] = (coef @ basis).clamp_min_(0)
        out[start : start + rows] += 0.1 * torch.rand(rows, dim, generator=g)
    return out


def make_data(kind: str, n_q: int, n: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if kind == "pixels":
        return pixel_rows(n_q, dim, split=1), pixel_rows(n, dim, split=0)
    if kind == "concat3d":
        basis = torch.randn(32, dim, generator=g)
        return concat3d_rows(n_q, dim, basis, g), concat3d_rows(n, dim, basis, g)
    return torch.randn(n_q, dim, generator=g), torch.randn(n, dim, generator=g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--queries", type=int, default=7180)
    p.add_argument("--database", type=int, default=89996)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--loop-queries", type=int, default=200)
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--repeats", type=int, default=1, help="timed rounds of (a), (a2), (b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=["gaussian", "pixels", "concat3d"], default="gaussian")
    p.add_argument("--device", default="cpu", help="cpu or cuda (RSS memory method: cpu only)")
    p.add_argument("--score-dtype", choices=["float16", "bfloat16"], help="also time (b) with this")
    p.add_argument("--child-memory", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        child_memory(args.child_memory, args.k)
        return

    n_q, n, dim, k = args.queries, args.database, args.dim, args.k
    device = torch.device(args.device)
    print(
        f"machine: {_cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, load average {os.getloadavg()}"
    )
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    print(f"shape: {n_q} queries x {n} database x {dim} dims float32, k={k}, data {args.data}")
    q, x = make_data(args.data, n_q, n, dim, args.seed)
    rng = np.random.default_rng(args.seed)
    ql, dl = rng.integers(0, args.classes, n_q), rng.integers(0, args.classes, n)
    q_dev, x_dev = q.to(device), x.to(device)
    torch.mm(q_dev[:256], x_dev[:4096].T)  # load BLAS kernels before timing
    knn_search(q_dev[:256], x_dev[:4096], k)
    score_dtype = getattr(torch, args.score_dtype) if args.score_dtype else None
    if score_dtype is not None:
        knn_search(q_dev[:256], x_dev[:4096], k, score_dtype=score_dtype)

    times: dict[str, list[float]] = {
        "a": [],
        "a2": [],
        "a3": [],
        "b": [],
        "b_search": [],
        "bh": [],
    }
    cpu: dict[str, list[float]] = {"a": [], "a2": [], "a3": [], "b": []}
    with_numpy = device.type == "cpu"
    idx_a2 = idx_b = idx_bh = None
    metrics: dict = {}
    for _ in range(args.repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        s = q_dev @ x_dev.T
        s.topk(k, dim=1).indices.cpu()
        times["a"].append(time.perf_counter() - t0)
        cpu["a"].append(time.process_time() - c0)
        del s
        t0, c0 = time.perf_counter(), time.process_time()
        s = torch.addmm(
            torch.linalg.vector_norm(x_dev, dim=1).square()[None], q_dev, x_dev.T, alpha=-2.0
        )
        idx_a2 = s.topk(k, dim=1, largest=False).indices.cpu()
        times["a2"].append(time.perf_counter() - t0)
        cpu["a2"].append(time.process_time() - c0)
        del s
        if with_numpy:
            t0, c0 = time.perf_counter(), time.process_time()
            s = torch.from_numpy(q.numpy() @ x.numpy().T)
            _ = s.topk(k, dim=1).indices
            times["a3"].append(time.perf_counter() - t0)
            cpu["a3"].append(time.process_time() - c0)
            del s
        c0 = time.process_time()
        total, search_s, metrics, idx_b = _run_b(q_dev, x_dev, ql, dl, k)
        cpu["b"].append(time.process_time() - c0)
        times["b"].append(total)
        times["b_search"].append(search_s)
        if score_dtype is not None:
            total, _, _, idx_bh = _run_b(q_dev, x_dev, ql, dl, k, score_dtype=score_dtype)
            times["bh"].append(total)

    n_loop = min(args.loop_queries, n_q)
    if n_loop:
        c0 = time.process_time()
        loop_s, idx_c = loop_baseline(q[:n_loop].numpy(), x.numpy(), k)
        loop_cpu = time.process_time() - c0
        c_ext = loop_s / n_loop * n_q
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _run_b(q_dev, x_dev, ql, dl, k)
        mem = {
            "extra_kib": (torch.cuda.max_memory_allocated(device) - before) / 1024,
            "method": "torch.cuda.max_memory_allocated - memory_allocated before (b), GPU",
            "seconds": float("nan"),
        }
    else:
        mem = measure_memory(q, x, ql, dl, k)

    a, a2, b = min(times["a"]), min(times["a2"]), min(times["b"])
    print(
        f"(a)  plain q @ x.T + topk(k), full {n_q}x{n} matrix: "
        f"{a:.2f} s  (rounds: {', '.join(f'{t:.2f}' for t in times['a'])}; "
        f"process CPU s: {', '.join(f'{t:.2f}' for t in cpu['a'])})"
    )
    print(
        f"(a2) one-shot addmm(||x||^2, q, x.T, alpha=-2) + topk: "
        f"{a2:.2f} s  (rounds: {', '.join(f'{t:.2f}' for t in times['a2'])}; "
        f"process CPU s: {', '.join(f'{t:.2f}' for t in cpu['a2'])})"
    )
    if with_numpy:
        print(
            f"(a3) (a) with numpy's BLAS for the product: {min(times['a3']):.2f} s  "
            f"(rounds: {', '.join(f'{t:.2f}' for t in times['a3'])}; "
            f"process CPU s: {', '.join(f'{t:.2f}' for t in cpu['a3'])})"
        )
    print(
        f"(b)  knn_search + compute_retrieval_metrics: {b:.2f} s "
        f"(search {min(times['b_search']):.2f} s; rounds: "
        f"{', '.join(f'{t:.2f}' for t in times['b'])}; "
        f"process CPU s: {', '.join(f'{t:.2f}' for t in cpu['b'])})"
    )
    if score_dtype is not None:
        same_h = int((idx_bh == idx_b).all(dim=1).sum())
        print(
            f"(b') knn_search(score_dtype={args.score_dtype}) + metrics: "
            f"{min(times['bh']):.2f} s (rounds: {', '.join(f'{t:.2f}' for t in times['bh'])}); "
            f"neighbours equal to (b) on {same_h}/{n_q} queries"
        )
    if n_loop:
        print(
            f"(c)  per-query numpy loop: {loop_s:.2f} s for {n_loop} queries "
            f"-> {c_ext:.1f} s extrapolated to {n_q} (process CPU {loop_cpu:.2f} s)"
        )
    print(
        "metrics of (b) on random labels: "
        + ", ".join(f"{key}={v:.4f}" for key, v in metrics.items())
    )
    extra_gb = mem["extra_kib"] * 1024 / GB
    inputs_gb = (q.numel() + x.numel()) * 4 / GB
    print(
        f"peak extra memory of (b): {extra_gb:.3f} GB beyond the {inputs_gb:.3f} GB inputs "
        f"[{mem['method']}; that run took {mem['seconds']:.2f} s]"
    )
    same_a2 = int((idx_b == idx_a2).all(dim=1).sum())
    print(f"neighbours: (b) == (a2) on {same_a2}/{n_q} queries")
    if n_loop:
        same_c = int((idx_b[:n_loop].numpy() == idx_c).all(axis=1).sum())
        print(f"neighbours: (b) == (c) on {same_c}/{n_loop} looped queries")
    ok_time, ok_mem = b / a <= 1.3, extra_gb <= 1.0
    print(f"ratio (b)/(a)  = {b / a:.3f}  (target <= 1.3: {'met' if ok_time else 'MISSED'})")
    print(f"ratio (b)/(a2) = {b / a2:.3f}")
    if with_numpy:
        print(f"ratio (b)/(a3) = {b / min(times['a3']):.3f}")
    print(
        "CPU-time ratio (b)/(a), best rounds = "
        f"{min(cpu['b']) / min(cpu['a']):.3f} (less sensitive to other processes than wall time)"
    )
    if n_loop:
        ok_loop = c_ext / b >= 50
        print(f"ratio (c)/(b)  = {c_ext / b:.1f}  (target >= 50: {'met' if ok_loop else 'MISSED'})")
    print(f"extra memory target <= 1 GB: {'met' if ok_mem else 'MISSED'}")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
