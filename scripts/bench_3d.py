"""3D embedding speed: slices batched across volumes vs one slice per forward pass.

Both paths embed the same AdrenalMNIST3D-shaped synthetic volumes (size^3 uint8, from
`cbmir.data.synthetic`) with the same extractor built from `configs/model/<model>.yaml`
(random weights: `pretrained=false`), side by side in one process, alternating per repeat:

- batched: `FrozenEmbedder(..., volume=VolumeSpec(...))` as `cbmir` runs it: loader-sized batches
  of volumes, all their slices cut into chunks of `--slice-batch-size` slices per forward pass;
- loop: the paper's code path, one forward pass per slice, features concatenated per volume.

It prints volumes/s of each, the ratio, and whether both give the same features (allclose).

    python scripts/bench_3d.py                      # resnet50, 32 volumes at 64 px
    python scripts/bench_3d.py --volumes 64 --repeats 2 --size 28 --threads 1

Timings from a busy machine mislead: with more runnable processes than cores, every small
parallel region of a multi-threaded forward pass waits for descheduled threads, which hurts the
one-slice loop most. The load average is printed at the start and end; compare runs made at a
similar load, or use --threads 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from cbmir.data import catalog
from cbmir.data.synthetic import synthetic_images, synthetic_labels
from cbmir.embedding import FrozenEmbedder, embed_items
from cbmir.volumes import VolumeSpec, instantiate_extractor

FLAG = "adrenalmnist3d"


def make_volumes(n: int, size: int, seed: int) -> torch.Tensor:
    """n synthetic AdrenalMNIST3D volumes [n, size, size, size] uint8."""
    labels = synthetic_labels(FLAG, n, np.random.default_rng(seed))
    blocks = list(synthetic_images(FLAG, size, labels, seed=seed))
    return torch.from_numpy(np.concatenate(blocks)[:n].copy())


def build_extractor(model: str):
    from cbmir.runner import compose

    cfg = compose("config", [f"model={model}", "model.pretrained=false"])
    extractor, _ = instantiate_extractor(cfg.model)
    return extractor


def embed_batched(embedder: FrozenEmbedder, volumes: torch.Tensor, batch: int) -> torch.Tensor:
    """As `cbmir` runs it (`Trainer.predict`): loader batches of volumes, slices batched inside."""
    return torch.from_numpy(embed_items(embedder, volumes, batch_size=batch))


def embed_loop(embedder: FrozenEmbedder, volumes: torch.Tensor) -> torch.Tensor:
    """The paper's way: one slice per forward pass, slice features concatenated in order."""
    out = []
    for volume in volumes:
        feats = [embedder._embed_2d(volume[s][None, None]) for s in range(volume.shape[0])]
        out.append(torch.cat(feats, dim=1))
    return torch.cat(out)


def timed(fn, *args) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def _load() -> str:
    """1-minute load average: other processes on a small machine skew both timings."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a configs/model option")
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, choices=catalog.valid_sizes(FLAG))
    parser.add_argument("--batch-size", type=int, default=16, help="volumes per loader batch")
    parser.add_argument("--slice-batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    volumes = make_volumes(args.volumes, args.size, args.seed)
    extractor = build_extractor(args.model)
    spec = VolumeSpec(reduce="concat", axes=(0,), slice_batch_size=args.slice_batch_size)
    embedder = FrozenEmbedder(extractor, volume=spec).eval()
    n_slices = volumes.shape[0] * volumes.shape[1]
    print(
        f"{args.model} (random weights) on {args.volumes} synthetic {catalog.paper_name(FLAG)} "
        f"volumes at {args.size}^3 = {n_slices} slices; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; loader batch {args.batch_size} volumes, "
        f"slice batch {args.slice_batch_size}; load average {_load()}"
    )
    times: dict[str, list[float]] = {"batched": [], "loop": []}
    # warm-up: first calls at a new shape pay one-off kernel setup in both paths
    embed_batched(embedder, volumes[:2], args.batch_size)
    for _ in range(args.repeats):
        batched, seconds = timed(embed_batched, embedder, volumes, args.batch_size)
        times["batched"].append(seconds)
        with torch.inference_mode():
            embed_loop(embedder, volumes[:1, :4])  # (after a predict run the module is frozen)
            loop, seconds = timed(embed_loop, embedder, volumes)
        times["loop"].append(seconds)
    dim = embedder.output_dim(tuple(volumes.shape[1:]))
    assert batched.shape == loop.shape == (args.volumes, dim)
    rate = {name: args.volumes / statistics.median(t) for name, t in times.items()}
    for name in ("batched", "loop"):
        per_run = ", ".join(f"{t:.1f}s" for t in times[name])
        print(f"{name:8s} {rate[name]:8.3f} volumes/s  ({per_run} for {args.volumes} volumes)")
    print(
        f"ratio    {rate['batched'] / rate['loop']:8.2f}x  (batched / loop); load average {_load()}"
    )
    diff = (batched - loop).abs().max().item()
    same = torch.allclose(batched, loop, rtol=1e-4, atol=1e-5)
    print(
        f"features {tuple(batched.shape)}: allclose(rtol=1e-4, atol=1e-5)={same}, "
        f"max |batched - loop| = {diff:.2e} (max |feature| {batched.abs().max().item():.2e})"
    )


if __name__ == "__main__":
    main()
