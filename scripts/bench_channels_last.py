"""channels_last against the default memory format, side by side, per extractor config.

Each model (its Hydra config, random weights) embeds the same uint8 batches through
`FrozenEmbedder` (preprocessing included) in both memory formats; rounds alternate which
format goes first. Prints images/s of both, their ratio, what `channels_last=auto` picks for the model (on for
conv nets) and the largest embedding difference relative to the largest value, beside the
model's own rounding floor: the same difference between float32 (default format) and a float64
copy of the model on the first 8 images (CPU only). A model whose float32 embeddings are far
from its float64 ones amplifies rounding (some random-initialised deep nets do), and then any
change of summation order, channels_last included, moves its embeddings as much.

    python scripts/bench_channels_last.py
    python scripts/bench_channels_last.py --models resnet50 biomedclip --size 224 --batches 2
    python scripts/bench_channels_last.py --device cuda --precision bf16-mixed --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbmir.embedding import FrozenEmbedder, embed_items, is_conv_net  # noqa: E402

DEFAULT_MODELS = ["resnet18", "resnet50", "densenet121", "vgg19", "efficientnetv2_m"]


def build(name: str, args: argparse.Namespace):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from tests.helpers import compose_config

    cfg = OmegaConf.to_container(
        compose_config([f"model={name}", "model.pretrained=false"]).model, resolve=True
    )
    cfg.pop("volume", None)  # 3D settings, not an extractor argument
    return instantiate(cfg)


def timed(embedder: FrozenEmbedder, batches: list[torch.Tensor], args) -> tuple[float, np.ndarray]:
    """Seconds of `Trainer.predict` over all batches (as `cbmir` embeds), first-batch rows."""
    first = embed_items(embedder, batches[0], args.precision, args.device)  # warm-up, compared
    images = torch.cat(batches)
    started = time.perf_counter()
    embed_items(embedder, images, args.precision, args.device, batch_size=len(batches[0]))
    return time.perf_counter() - started, first


def rounding_floor(extractor, images, float32_rows, scale: float, args) -> float:
    """max |float32 - float64| / scale on `images` (nan on a GPU or under autocast)."""
    if args.device != "cpu" or args.precision != "32-true":
        return float("nan")
    reference = copy.deepcopy(extractor).double()
    with torch.inference_mode():
        rows = reference.embed(reference.preprocess(images).double()).numpy()
    return float(np.abs(rows - float32_rows).max()) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"]
    )
    parser.add_argument("--size", type=int, default=64, help="side of the raw uint8 images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    device = torch.device(args.device)
    print(
        f"# channels_last vs default: {args.size}px uint8, batch {args.batch_size} x "
        f"{args.batches}, {args.rounds} alternating rounds, {args.precision}, {args.device}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    print(
        "| model | auto picks | default img/s | channels_last img/s | ratio "
        "| rel. diff | fp32 vs fp64 |"
    )
    print("|---|---|---|---|---|---|---|", flush=True)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.size, args.size)
    batches = [
        torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device)
        for _ in range(args.batches)
    ]
    for name in args.models:
        torch.manual_seed(0)
        extractor = build(name, args).to(device)
        rates: dict[bool, list[float]] = {False: [], True: []}
        outputs: dict[bool, np.ndarray] = {}
        for round_ in range(args.rounds):
            for channels_last in (False, True) if round_ % 2 == 0 else (True, False):
                embedder = FrozenEmbedder(extractor, channels_last=channels_last)
                embedder.on_predict_start()  # sets the weights' memory format either way
                seconds, outputs[channels_last] = timed(embedder, batches, args)
                rates[channels_last].append(args.batch_size * args.batches / seconds)
        plain, fast = float(np.median(rates[False])), float(np.median(rates[True]))
        scale = float(np.abs(outputs[False]).max()) or 1.0
        diff = float(np.abs(outputs[True] - outputs[False]).max()) / scale
        floor = rounding_floor(extractor, batches[0][:8], outputs[False][:8], scale, args)
        auto = "on" if is_conv_net(extractor) else "off"
        print(
            f"| {name} | {auto} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f} | {diff:.1e} "
            f"| {floor:.1e} |",
            flush=True,
        )
        del extractor
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
