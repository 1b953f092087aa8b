"""Embedding throughput: the whole pipeline against the bare model forward, side by side.

End to end = Lightning predict over a memory-mapped npz (data loading, batched uint8 ->
float preprocessing, the model, writing the store). Bare = the same model on tensors already
preprocessed in memory, same batch size. The ratio is what matters: this machine is shared
and absolute seconds drift between runs.

    python scripts/bench_embed.py --model resnet50.tv_in1k --size 64 --images 1024 --batch 64
    python scripts/bench_embed.py --device cuda --precision bf16-mixed --channels-last \
        --size 224 --images 8192 --batch 256 --workers 8        # a GPU run (pinned memory)

On a GPU the bare side gets the images already on the device, preprocessed, under the same
autocast as the Trainer's precision; the end-to-end side reads uint8 from the memory-mapped
store through DataLoader workers into pinned memory, copies them, preprocesses on the device
and writes float32 rows back to the store.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from cbmir.data import NpzDataModule
from cbmir.embedding import EmbeddingStoreWriter, FrozenEmbedder, PlannedEntry, embed_items
from cbmir.extractors.timm_extractor import TimmExtractor
from cbmir.store import EmbeddingStore, make_key


def write_npz(path: Path, n: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=(n, 1))
    np.savez(path, train_images=images, train_labels=labels, test_images=images[:8],
             test_labels=labels[:8])  # fmt: skip
    return path


def bare_forward(embedder: FrozenEmbedder, images: torch.Tensor, args) -> float:
    device = torch.device(args.device)
    embedder.to(device)
    embedder.on_predict_start()  # eval mode, channels_last weights when asked
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    inputs = [
        embedder.extractor.preprocess(images[i : i + args.batch].to(device)).contiguous(
            memory_format=memory_format
        )
        for i in range(0, len(images), args.batch)
    ]
    autocast = trainer_precision(args)
    synchronize()
    started = time.perf_counter()
    with torch.inference_mode(), autocast:
        for x in inputs:
            embedder.extractor.embed(x)
    synchronize()
    return time.perf_counter() - started


def input_costs(embedder: FrozenEmbedder, datamodule, args) -> tuple[float, float]:
    """Seconds per batch for the predict loader alone, and for loader + preprocessing."""
    datamodule.predict_splits = ["train"]
    device = torch.device(args.device)
    started = time.perf_counter()
    batches = sum(1 for _ in datamodule.predict_dataloader())
    loader = (time.perf_counter() - started) / batches
    autocast = trainer_precision(args)
    started = time.perf_counter()
    with torch.inference_mode(), autocast:
        for batch in datamodule.predict_dataloader():
            embedder.extractor.preprocess(batch["image"].to(device, non_blocking=True))
    synchronize()
    return loader, (time.perf_counter() - started) / batches


def trainer_precision(args):
    """The Trainer's own precision context (its autocast) for the bare side: no imitation."""
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=args.precision, logger=False)
    return trainer.precision_plugin.forward_context()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def end_to_end(embedder, datamodule, store: EmbeddingStore, key: str, args) -> float:
    labels = datamodule.labels("train")
    dim = embedder.output_dim(datamodule.image_shape)
    plan = [PlannedEntry("train", key, len(labels), dim, labels)]
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
        callbacks=[EmbeddingStoreWriter(store, plan)],
    )  # fmt: skip
    datamodule.predict_splits = ["train"]
    started = time.perf_counter()
    trainer.predict(embedder, datamodule=datamodule, return_predictions=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50.tv_in1k")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"]
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.device == "cpu" and args.precision == "16-mixed":
        parser.error("--precision 16-mixed needs --device cuda (use bf16-mixed on a CPU)")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        npz = write_npz(Path(tmp) / "bench.npz", args.images, args.size)
        datamodule = NpzDataModule(npz, batch_size=args.batch, num_workers=args.workers)
        datamodule.prepare_data()
        datamodule.setup("predict")
        embedder = FrozenEmbedder(
            TimmExtractor(model_name=args.model, pretrained=False),
            channels_last=args.channels_last,
        )
        images = torch.from_numpy(np.ascontiguousarray(datamodule.images("train"))).permute(
            0, 3, 1, 2
        )
        store = EmbeddingStore(Path(tmp) / "store")
        bare_forward(embedder, images[: args.batch * 2], args)  # warm-up
        print(f"torch threads: {torch.get_num_threads()}, {args.images} images {args.size}px, "
              f"batch {args.batch}, workers {args.workers}, model {args.model}, "
              f"device {args.device}, precision {args.precision}, "
              f"channels_last {args.channels_last}, "
              f"load average {os.getloadavg()}")  # fmt: skip
        ratios, bare_rates, e2e_rates = [], [], []
        for repeat in range(args.repeats):
            # alternate which side runs first so warm caches and drifting load favour neither
            key = make_key({"bench": repeat}, {"n": args.images})
            if repeat % 2 == 0:
                bare = bare_forward(embedder, images, args)
                e2e = end_to_end(embedder, datamodule, store, key, args)
            else:
                e2e = end_to_end(embedder, datamodule, store, key, args)
                bare = bare_forward(embedder, images, args)
            ratios.append(bare / e2e)
            bare_rates.append(args.images / bare)
            e2e_rates.append(args.images / e2e)
            print(
                f"run {repeat}: bare forward {args.images / bare:7.1f} img/s | "
                f"end-to-end {args.images / e2e:7.1f} img/s | e2e/bare throughput {bare / e2e:.3f}"
            )
            stored = store.load(key).embeddings
            assert stored.shape == (args.images, embedder.output_dim(datamodule.image_shape))
        loader, prepared = input_costs(embedder, datamodule, args)
        print(
            f"per batch of {args.batch}: predict loader alone {loader * 1e3:.2f} ms, "
            f"loader + preprocessing {prepared * 1e3:.2f} ms, bare forward "
            f"{args.batch / np.median(bare_rates) * 1e3:.1f} ms (median)"
        )
        print(f"load average at end {os.getloadavg()}")
        # the store holds what the model computes: rows equal a direct embedding of the same images
        direct = embed_items(embedder, images[: args.batch], args.precision, args.device)
        gap = float(np.abs(store.load(key).embeddings[: args.batch] - direct).max())
        scale = float(np.abs(direct).max())
        print(f"stored rows vs a direct forward: max |diff| {gap:.2e} (max |value| {scale:.2e})")
        # the machine drifts by 10-20% between runs; the median over alternating runs is the
        # figure, the ratio of the median throughputs a cross-check
        median_ratio = float(np.median(ratios))
        print(
            f"median img/s: bare {np.median(bare_rates):.1f}, end-to-end {np.median(e2e_rates):.1f}"
            f" (ratio {np.median(e2e_rates) / np.median(bare_rates):.3f})"
        )
        verdict = "met" if median_ratio >= 0.9 else "MISSED"
        print(f"median e2e/bare throughput ratio: {median_ratio:.3f} (target >= 0.90: {verdict})")


if __name__ == "__main__":
    main()
