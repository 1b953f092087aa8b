"""Do random weights (`model.pretrained=false`) see the whole image? One line per model config.

On scikit-learn's real digits (1,797 images, 28 px, as `write_digits_npz` writes them):
- distinct: how many distinct embedding rows the first `--n` images give (a near-constant
  network collapses images onto few rows);
- spread: mean distance of the rows to their centroid over the centroid's norm;
- region sensitivity (`cbmir.extractors.random_init.region_sensitivity`): each cell of a
  `--grid` x `--grid` partition of `--n-sens` images inverted in turn; the smallest and the median
  relative change of the embedding, and how many (image, cell) pairs moved it by < 1e-6;
- acc@1: leave-one-out nearest-neighbour accuracy (Euclidean) on the `--n` images.

    python scripts/check_random_init.py --models resnet18,resnet50 --n 1797
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(name: str, overrides: list[str]):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cbmir.query.database import compose_config

    cfg = compose_config([f"model={name}", "model.pretrained=false", *overrides])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("volume", None)
    return instantiate(model_cfg).freeze()


def digits(n: int) -> tuple[torch.Tensor, np.ndarray]:
    from cbmir.data.synthetic import write_digits_npz

    with (
        tempfile.TemporaryDirectory() as tmp,
        np.load(write_digits_npz(Path(tmp) / "d.npz")) as npz,
    ):
        images = np.concatenate([npz[f"{s}_images"] for s in ("train", "val", "test")])
        labels = np.concatenate([npz[f"{s}_labels"] for s in ("train", "val", "test")])
    return torch.from_numpy(images[:n, None]), labels[:n, 0]


@torch.no_grad()
def embed_all(extractor, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([extractor(images[i : i + batch]) for i in range(0, len(images), batch)])


def loo_acc1(rows: torch.Tensor, labels: np.ndarray) -> float:
    dist = torch.cdist(rows.double(), rows.double())
    dist.fill_diagonal_(float("inf"))
    return float((labels[dist.argmin(dim=1).numpy()] == labels).mean())


def main() -> None:
    from cbmir.extractors.random_init import region_sensitivity

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--n", type=int, default=1797)
    parser.add_argument("--n-sens", type=int, default=4)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    images, labels = digits(args.n)
    for name in [m for m in args.models.split(",") if m]:
        started = time.perf_counter()
        extractor = build(name, args.override)
        rows = embed_all(extractor, images, args.batch)
        distinct = len(np.unique(rows.numpy(), axis=0))
        centre = rows.double().mean(dim=0)
        spread = float((rows.double() - centre).norm(dim=1).mean() / centre.norm().clamp_min(1e-12))
        sens = region_sensitivity(
            lambda x, e=extractor: embed_all(e, x, args.batch), images[: args.n_sens], args.grid
        )
        print(
            f"{name:18s} n={len(rows)} distinct={distinct} spread={spread:.3g} "
            f"sens_min={sens.min():.3g} sens_median={np.median(sens):.3g} "
            f"blind_cells={int((sens < 1e-6).sum())}/{sens.size} "
            f"acc1={loo_acc1(rows, labels):.3f} ({time.perf_counter() - started:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
