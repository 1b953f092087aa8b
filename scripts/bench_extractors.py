"""Images/s of each extractor config, random weights (`model.pretrained=false`), 224 px inputs.

    python scripts/bench_extractors.py                       # CPU, every model config
    python scripts/bench_extractors.py --models uni conch --batch-size 8 --batches 4
    python scripts/bench_extractors.py --device cuda --precision bf16 --batch-size 64

Each model: build from its Hydra config, one warm-up batch, then `--batches` timed batches of
uint8 [B, 3, 224, 224] images through `Trainer.predict` of a `FrozenEmbedder` (its own
preprocessing included), as the pipeline embeds. Models over `--big-params` million parameters
run `--big-batches` batches (ViT-g/14 is ~1B parameters: slow on CPU). Peak memory is the process's maximum RSS so far
(CPU; each model runs in its own process) or the peak CUDA allocation (GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = [
    "resnet50",
    "medclip",
    "biomedclip",
    "conch",
    "dinov2_vitl14",
    "uni",
    "uni2",
    "virchow",
    "virchow2",
    "openclip_vitg14",
]


def bench(name: str, args: argparse.Namespace) -> dict:
    from hydra.utils import instantiate
    from tests.helpers import compose_config

    from cbmir.embedding import FrozenEmbedder, embed_items

    overrides = [f"model={name}", "model.pretrained=false"]
    if name in ("resnet50", "vgg19", "densenet121", "efficientnetv2_m"):
        overrides.append("model.input_size=224")  # the CNNs otherwise keep the image's size
    device = torch.device(args.device)
    t0 = time.perf_counter()
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_config(overrides).model, resolve=True)
    cfg.pop("volume", None)  # 3D settings, not an extractor argument
    extractor = instantiate(cfg).freeze().to(device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in extractor.parameters())
    big = params > args.big_params * 1e6
    batches = args.big_batches if big else args.batches
    bs = args.batch_size
    images = torch.randint(0, 256, (bs, 3, args.size, args.size), dtype=torch.uint8, device=device)
    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(args.precision, "32-true")
    embedder = FrozenEmbedder(extractor, precision=precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = embed_items(embedder, images, precision, device, bs)  # warm-up (as `cbmir` embeds)
    t0 = time.perf_counter()
    embed_items(embedder, images.repeat(batches, 1, 1, 1), precision, device, bs)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {
        "model": name,
        "params_m": params / 1e6,
        "dim": int(out.shape[1]),
        "input": extractor.preprocess(images[:1]).shape[-1],
        "build_s": build_s,
        "images": batches * bs,
        "ips": batches * bs / seconds,
        "peak_gb": peak_gb,
    }
    del extractor, embedder, out, images
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--big-batches", type=int, default=1, help="batches for big models")
    parser.add_argument(
        "--big-params", type=float, default=500, help="'big' above this many M params"
    )
    parser.add_argument("--size", type=int, default=224, help="side of the raw input images")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # one model, JSON out
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        print("BENCH " + json.dumps(bench(args.single, args)), flush=True)
        return
    dev = args.device
    if dev.startswith("cuda"):
        hw = torch.cuda.get_device_name(torch.device(dev))
    else:
        hw = f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(
        f"# cbmir extractor throughput: random weights, {args.size}px uint8 input, batch "
        f"{args.batch_size}, {args.precision}, {hw}, torch {torch.__version__}",
        flush=True,
    )
    header = f"| {'model':<16} | {'params (M)':>10} | {'dim':>5} | {'input px':>8} | {'build (s)':>9} | {'images':>6} | {'images/s':>9} | {'peak mem (GB)':>13} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)
    for name in args.models:
        # one process per model: its own peak memory, no allocator carry-over
        cmd = [sys.executable, __file__, "--single", name] + [
            a for a in sys.argv[1:] if a != "--models" and a not in args.models
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:100]
            print(f"| {name:<16} | failed: {err} |", flush=True)
            continue
        r = json.loads(lines[-1][6:])
        print(
            f"| {r['model']:<16} | {r['params_m']:>10.1f} | {r['dim']:>5} | {r['input']:>8} | "
            f"{r['build_s']:>9.1f} | {r['images']:>6} | {r['ips']:>9.2f} | {r['peak_gb']:>13.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
