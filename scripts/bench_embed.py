"""Embedding throughput: the whole pipeline against the bare model forward, side by side.

End to end = Lightning predict over a memory-mapped npz (data loading, batched uint8 ->
float preprocessing, the model, writing the store). Bare = the same model on tensors already
preprocessed in memory, same batch size. The ratio is what matters: this machine is shared
and absolute seconds drift between runs.

    python scripts/bench_embed.py --model resnet50.tv_in1k --size 64 --images 1024 --batch 64
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from cbmir.data import NpzDataModule
from cbmir.embedding import EmbeddingStoreWriter, FrozenEmbedder, PlannedEntry
from cbmir.extractors import create
from cbmir.store import EmbeddingStore, make_key


def write_npz(path: Path, n: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=(n, 1))
    np.savez(path, train_images=images, train_labels=labels, test_images=images[:8],
             test_labels=labels[:8])  # fmt: skip
    return path


def bare_forward(embedder: FrozenEmbedder, images: torch.Tensor, batch: int) -> float:
    inputs = [
        embedder.extractor.preprocess(images[i : i + batch]) for i in range(0, len(images), batch)
    ]
    started = time.perf_counter()
    with torch.inference_mode():
        for x in inputs:
            embedder.extractor.embed(x)
    return time.perf_counter() - started


def end_to_end(embedder, datamodule, store: EmbeddingStore, key: str, args) -> float:
    labels = datamodule.labels("train")
    dim = embedder.output_dim(datamodule.image_shape)
    plan = [PlannedEntry("train", key, len(labels), dim, labels)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
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
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        npz = write_npz(Path(tmp) / "bench.npz", args.images, args.size)
        datamodule = NpzDataModule(npz, batch_size=args.batch, num_workers=args.workers)
        datamodule.prepare_data()
        datamodule.setup("predict")
        embedder = FrozenEmbedder(create("timm", model_name=args.model, pretrained=False))
        images = torch.from_numpy(np.ascontiguousarray(datamodule.images("train"))).permute(
            0, 3, 1, 2
        )
        store = EmbeddingStore(Path(tmp) / "store")
        bare_forward(embedder, images[: args.batch * 2], args.batch)  # warm-up
        print(f"torch threads: {torch.get_num_threads()}, {args.images} images {args.size}px, "
              f"batch {args.batch}, workers {args.workers}, model {args.model}")  # fmt: skip
        ratios = []
        for repeat in range(args.repeats):
            bare = bare_forward(embedder, images, args.batch)
            key = make_key({"bench": repeat}, {"n": args.images})
            e2e = end_to_end(embedder, datamodule, store, key, args)
            ratios.append(bare / e2e)
            print(
                f"run {repeat}: bare forward {args.images / bare:7.1f} img/s | "
                f"end-to-end {args.images / e2e:7.1f} img/s | e2e/bare throughput {bare / e2e:.3f}"
            )
            stored = store.load(key).embeddings
            assert stored.shape == (args.images, embedder.output_dim(datamodule.image_shape))
        print(f"median e2e/bare throughput ratio: {float(np.median(ratios)):.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
