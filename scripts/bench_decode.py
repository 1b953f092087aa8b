"""Decoding throughput of own collections (docs/data.md) against a bare Pillow loop.

Writes N PNG files (RGB, 224 px by default) as a class-folder tree, then, in alternating
rounds: a bare loop (`Image.open` + `np.asarray`, one process, and two side by side on
half the files each), and cbmir's first-run decode
(`prepare_collection`: list, stamp, one decode pass with 0 or 2 DataLoader workers writing
rows into the cache, install), each into a fresh cache. Then the second run: the key check
that finds the cache valid (as a fresh process pays it; the median of --rounds checks), and
reading every image back from the memory map. Pending writes are flushed (`os.sync`) before
each timed step, so that no step pays for the write-back of another. The load average is
printed at the start and the end, and each variant's CPU time (with its workers): on a shared
machine only ratios measured side by side mean something. Hence the paired ratios: each
round's cbmir rate over the bare rate of the same round (the variants' order rotates from
round to round), their median and range; and every file is read once, untimed, before the
first round (the first bare loop of earlier runs read cold files: 385-420 files/s against
600-776 in later rounds).

    python scripts/bench_decode.py --n 2000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cbmir.data import collection_cache
from cbmir.data.collection import folder_collection
from cbmir.data.collection_cache import prepare_collection
from cbmir.data.decode import DecodeSettings


def write_pngs(root: Path, n: int, size: int) -> None:
    """n RGB pictures with smooth structure plus noise (PNG compresses them like photos)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        split, cls = ("train", "test")[i % 5 == 0], "ab"[i % 2]
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        base = (np.sin(xx / (7 + i % 11)) + np.cos(yy / (5 + i % 13))) * 60 + 128
        noise = rng.integers(-20, 20, size=(size, size, 3))
        image = np.clip(base[:, :, None] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:06d}.png")


def _bare(files: list[Path]) -> None:
    for path in files:
        with Image.open(path) as im:
            np.asarray(im)


def warm(files: list[Path]) -> None:
    """Read every file once, untimed: all variants then start from the page cache."""
    for path in files:
        path.read_bytes()


def bare_loop(files: list[Path]) -> float:
    """files/s of the plainest decode: open, decode, to an array."""
    start = time.perf_counter()
    _bare(files)
    return len(files) / (time.perf_counter() - start)


def bare_loops(files: list[Path], processes: int) -> float:
    """files/s of `processes` bare loops side by side (forked, each every n-th file): what
    the plainest decode gets from the same cores as cbmir's workers, whatever the machine
    loses when all of them are busy."""
    context = multiprocessing.get_context("fork")
    start = time.perf_counter()
    loops = [context.Process(target=_bare, args=(files[i::processes],)) for i in range(processes)]
    for loop in loops:
        loop.start()
    for loop in loops:
        loop.join()
        if loop.exitcode != 0:
            raise RuntimeError(f"a bare loop failed (exit code {loop.exitcode})")
    return len(files) / (time.perf_counter() - start)


SYNC = True  # --no-sync: the method of the earlier figures (write-back hits whichever step runs)


def settle() -> None:
    """Flush pending writes (earlier steps' caches, a removed cache) before a clock starts."""
    if SYNC:
        os.sync()


def cbmir_decode(root: Path, cache: Path, workers: int) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    settle()
    start = time.perf_counter()
    collection = folder_collection(root, cache, 0, {"train": 0.8, "test": 0.2})
    prepare_collection(collection, DecodeSettings(), cache, "bench", workers=workers)
    return len(collection.rows) / (time.perf_counter() - start)


def cache_check(root: Path, cache: Path) -> tuple[float, Path]:
    """(seconds to find the cache valid, as a second run does, the cache folder)."""
    collection_cache._library_versions.cache_clear()  # read once per process: pay it here
    settle()
    start = time.perf_counter()
    collection = folder_collection(root, cache, 0, {"train": 0.8, "test": 0.2})
    folder, _ = prepare_collection(collection, DecodeSettings(), cache, "bench")
    return time.perf_counter() - start, folder


def second_run(root: Path, cache: Path, checks: int) -> tuple[list[float], float]:
    """(seconds of each of `checks` cache checks, seconds to read every image from the cache).

    The check is timed several times: one timing right after gigabytes of cache writes ranged
    from 0.35 to 0.63 s on 20,000 files."""
    times = []
    for _ in range(checks):
        seconds, folder = cache_check(root, cache)
        times.append(seconds)
    checked = time.perf_counter()
    total = 0
    for split in ("train", "test"):
        images = np.load(folder / f"{split}_images.npy", mmap_mode="r")
        for start_row in range(0, len(images), 256):
            total += int(images[start_row : start_row + 256].sum(dtype=np.uint64) > 0)
    return times, time.perf_counter() - checked


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, joined):
    what a variant costs whatever else the machine runs."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run) -> tuple[float, float]:
    """(files/s as `run` returns it, CPU seconds it used)."""
    start = cpu_seconds()
    rate = run()
    return rate, cpu_seconds() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="PNG files (default 20000)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    parser.add_argument(
        "--no-sync", action="store_true", help="do not flush writes before each timed step"
    )
    args = parser.parse_args()
    global SYNC
    SYNC = not args.no_sync
    print(f"load average at start: {_load()}; os.sync before each step: {SYNC}", flush=True)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_decode_"))
    root, cache = work / "pngs", work / "cache"
    if not root.is_dir():
        print(f"writing {args.n} PNG files ({args.size} px RGB) into {root} ...", flush=True)
        write_pngs(root, args.n, args.size)
    files = sorted(root.rglob("*.png"))
    runs = {
        "bare Pillow loop": lambda: bare_loop(files),
        "bare, 2 processes": lambda: bare_loops(files, 2),
        "cbmir 0 workers": lambda: cbmir_decode(root, cache, 0),
        "cbmir 2 workers": lambda: cbmir_decode(root, cache, 2),
    }
    results: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    warm(files)
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = runs[name]
            settle()  # no variant pays for the previous one's writes
            rate, seconds = timed(run)
            results[name].append(rate)
            cpu[name].append(seconds)
        print(
            f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in results.items()),
            flush=True,
        )
    bare = statistics.median(results["bare Pillow loop"])
    bare_cpu = statistics.median(cpu["bare Pillow loop"])
    print(f"\n{len(files)} PNG files, {args.size} px, median of {args.rounds} rounds")
    bare2 = statistics.median(results["bare, 2 processes"])
    for name, rates in results.items():
        med = statistics.median(rates)
        workers = 2 if "2" in name else 1
        used = statistics.median(cpu[name])
        print(
            f"  {name:18s} {med:8.0f} files/s   {med / bare:5.3f}x bare"
            f"   {med / bare / workers:5.3f}x bare per worker"
            f"   CPU {1000 * used / len(files):.2f} ms/file ({bare_cpu / used:.2f}x bare's)"
        )
    print(
        f"  side by side: cbmir 2 workers {statistics.median(results['cbmir 2 workers']) / bare2:.3f}x"
        f" the 2 bare processes; 2 bare processes {bare2 / bare / 2:.3f}x bare per process"
    )
    print_paired(results)
    checks, read = second_run(root, cache, args.rounds)
    check = statistics.median(checks)
    decode_s = len(files) / statistics.median(results["cbmir 0 workers"])
    decode2_s = len(files) / statistics.median(results["cbmir 2 workers"])
    print(
        f"second run: cache check {check:.3f} s (median of "
        f"{', '.join(f'{c:.3f}' for c in checks)}) + read all {read:.3f} s = "
        f"{100 * (check + read) / decode_s:.2f}% of the 0-worker decode ({decode_s:.1f} s); "
        f"the check alone {100 * check / decode_s:.2f}% of it, "
        f"{100 * check / decode2_s:.2f}% of the 2-worker decode ({decode2_s:.1f} s)"
    )
    print(f"load average at the end: {_load()}")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


def print_paired(results: dict[str, list[float]]) -> None:
    """Each round's ratio of a cbmir rate to a bare rate of the same round: what drifts
    between rounds (the machine's state) cancels; the median and range of the rounds."""
    pairs = {
        "cbmir 0 workers / bare": ("cbmir 0 workers", "bare Pillow loop", 1),
        "cbmir 2 workers / bare, per worker": ("cbmir 2 workers", "bare Pillow loop", 2),
        "cbmir 2 workers / 2 bare processes": ("cbmir 2 workers", "bare, 2 processes", 1),
    }
    print("paired by round (median, range):")
    for label, (ours, bare, workers) in pairs.items():
        ratios = [a / b / workers for a, b in zip(results[ours], results[bare], strict=True)]
        print(
            f"  {label:36s} {statistics.median(ratios):.3f}"
            f"   ({min(ratios):.3f} - {max(ratios):.3f}; rounds: "
            f"{', '.join(f'{x:.3f}' for x in ratios)})"
        )


def _load() -> str:
    """1, 5 and 15 minute load averages (above the core count, the variants share CPUs)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
