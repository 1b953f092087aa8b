"""What the paper grid costs on one device: every `experiment=paper` job, timed.

Each job is the real embedding path (Lightning predict over a memory-mapped npz in the
MedMNIST layout, the extractor's preprocessing, the store writer) with random weights of the
real architecture (`model.pretrained=false`, the grid's own model configs), on synthetic images
at the job's size, then an exact k=5 Euclidean search (`knn_search`). Split sizes are the real
ones (medmnist INFO `n_samples`: test queries, train database).

    python scripts/bench_grid.py --device cpu --fraction 0.002 --models resnet50,vgg19
    python scripts/bench_grid.py --device cuda --precision bf16-mixed --workers 8 \
        --pin-memory --batch 512 --search full                 # the whole grid on one GPU

Projection (`--fraction F`, 0 < F <= 1): each split embeds ceil(F * n) images (at least 1
query, 5 database), and the job's embedding seconds are projected linearly, split by split:
measured seconds x n / ceil(F * n) (images/s is what is measured; F=1 measures everything).
This is an upper bound at small fractions: each split's fixed cost (predict loop start, store
entry open and publish, a few seconds on a loaded CPU) is scaled with the images; compare the
images/s of a cell with few images against one with many.
One warm-up batch per job runs before the clock starts (a real job pays it once, a tiny
fraction would otherwise be dominated by it); building the model is not counted.
Search: `--search full` searches random vectors of the job's real dimension at the real split
sizes (the cost of an exact search does not depend on the values), nothing projected;
`--search fraction` searches q = ceil(F * n_query) (at least 8) and 4q random queries against the
whole database and projects along that line: t(q) + (n_query - q) x (t(4q) - t(q)) / 3q (an exact
search is linear in the queries, plus a fixed cost that a plain ratio would multiply).
`--models` / `--cells` select jobs; the totals are then those of the selected jobs (the line says
how many of the 252).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from cbmir.config import config_dir
from cbmir.data import NpzDataModule, catalog
from cbmir.embedding import AUTOCAST_DTYPES, EmbeddingStoreWriter, FrozenEmbedder, PlannedEntry
from cbmir.retrieval import knn_search
from cbmir.store import EmbeddingStore
from cbmir.sweeps import parse_cell
from cbmir.volumes import split_model_config

QUERY, DATABASE = "test", "train"


@dataclass
class JobTiming:
    model: str
    cell: str
    dim: int
    n_query: int
    n_database: int
    embedded: int  # images embedded (both splits)
    embed_seconds: float  # measured
    embed_seconds_full: float  # projected to every image
    search_seconds: float  # at the real sizes (full) or projected (fraction)
    search_mode: str

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.embed_seconds


def paper_grid() -> tuple[list[str], list[str]]:
    """The grid's models and cells, read from configs/experiment/paper.yaml."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", ["experiment=paper"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    return (
        [m.strip() for m in params.model.split(",")],
        [c.strip() for c in params.cell.split(",")],
    )


def model_config(model: str) -> DictConfig:
    """The grid's config of one extractor, with random weights."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", ["experiment=paper", f"model={model}", "model.pretrained=false"])
    return cfg.model


def synthetic_npz(root: Path, flag: str, size: int, fraction: float) -> Path:
    """The first ceil(F * n) images of the test and train splits, random uint8 in the MedMNIST
    layout (N x H x W, N x H x W x 3, volumes N x D x H x W); cached per cell."""
    path = root / f"{flag}_{size}_{fraction}.npz"
    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    if catalog.is_3d(flag):
        shape: tuple[int, ...] = (size, size, size)
    else:
        shape = (size, size) if catalog.n_channels(flag) == 1 else (size, size, 3)
    arrays = {}
    for split in (QUERY, DATABASE):
        n = subset_size(catalog.n_samples(flag)[split], fraction, split)
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(path, **arrays)
    return path


#: fewest images embedded per split: one query, a database of k=5
MIN_IMAGES = {QUERY: 1, DATABASE: 5}


def subset_size(n: int, fraction: float, split: str) -> int:
    return min(n, max(MIN_IMAGES[split], math.ceil(fraction * n)))


def time_embedding(
    embedder: FrozenEmbedder, datamodule: NpzDataModule, store: EmbeddingStore, args
) -> tuple[dict[str, float], int]:
    """Seconds per split of the real predict path (store writer included), after one warm-up
    batch; and the embedding's dimension."""
    dim = embedder.output_dim(tuple(datamodule.image_shape))
    plan = [
        PlannedEntry(s, f"{s}-{time.monotonic_ns()}", len(datamodule.labels(s)), dim,
                     datamodule.labels(s))
        for s in (QUERY, DATABASE)
    ]  # fmt: skip
    writer = EmbeddingStoreWriter(store, plan)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        callbacks=[writer],
    )  # fmt: skip
    warm_up(embedder, datamodule, args)
    datamodule.predict_splits = [QUERY, DATABASE]
    trainer.predict(embedder, datamodule=datamodule, return_predictions=False)
    return dict(writer.seconds), dim


def warm_up(embedder: FrozenEmbedder, datamodule: NpzDataModule, args) -> None:
    """One batch through the model on the device (kernels, autotuning, allocator)."""
    device = torch.device(args.device)
    batch = next(iter(datamodule.dataloader(DATABASE)))["image"].to(device)
    embedder.to(device)
    embedder.on_predict_start()
    dtype = AUTOCAST_DTYPES.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        embedder.embed_images(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_search(n_query: int, n_database: int, dim: int, args) -> float:
    """Seconds of an exact k=5 Euclidean search, random vectors of this shape on the device."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(n_query, dim, generator=generator).to(args.device)
    database = torch.randn(n_database, dim, generator=generator).to(args.device)
    knn_search(queries[:1], database, 5, "euclidean")  # warm-up: allocator, thread pool
    synchronize(args.device)
    started = time.perf_counter()
    knn_search(queries, database, 5, "euclidean")
    synchronize(args.device)
    return time.perf_counter() - started


def projected_search(n_query: int, n_database: int, dim: int, args) -> float:
    """Search seconds at n_query queries from two smaller searches (see the module doc)."""
    q = min(n_query, max(8, math.ceil(args.fraction * n_query)))
    if 4 * q >= n_query:
        return time_search(n_query, n_database, dim, args)
    small, large = (time_search(m, n_database, dim, args) for m in (q, 4 * q))
    per_query = max(0.0, (large - small) / (3 * q))
    return small + (n_query - q) * per_query


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_job(model: str, embedder_for, cell: str, data_root: Path, args) -> JobTiming:
    flag, size = parse_cell(cell)
    n = catalog.n_samples(flag)
    npz = synthetic_npz(data_root, flag, size, args.fraction)
    datamodule = NpzDataModule(
        npz, volumes=catalog.is_3d(flag), batch_size=args.batch, num_workers=args.workers,
        pin_memory=args.pin_memory, cache_dir=data_root / "npy",
    )  # fmt: skip
    datamodule.prepare_data()
    datamodule.setup("predict")
    embedder = embedder_for(catalog.is_3d(flag))
    store = EmbeddingStore(data_root / "store")
    seconds, dim = time_embedding(embedder, datamodule, store, args)
    shutil.rmtree(store.root, ignore_errors=True)  # the grid's entries would fill the disk
    embedded = {s: len(datamodule.labels(s)) for s in (QUERY, DATABASE)}
    projected = sum(seconds[s] * n[s] / embedded[s] for s in (QUERY, DATABASE))
    if args.search == "full":
        search = time_search(n[QUERY], n[DATABASE], dim, args)
    else:
        search = projected_search(n[QUERY], n[DATABASE], dim, args)
    return JobTiming(
        model, cell, dim, n[QUERY], n[DATABASE], sum(embedded.values()), sum(seconds.values()),
        projected, search, args.search,
    )  # fmt: skip


def embedders(model: str, args):
    """A function 3D? -> FrozenEmbedder, building the extractor once per model."""
    model_cfg, volume = split_model_config(model_config(model))
    extractor = instantiate(model_cfg)

    def make(is_volume: bool) -> FrozenEmbedder:
        return FrozenEmbedder(
            extractor, channels_last=args.channels_last,
            volume=volume if is_volume else None, precision=args.precision,
        )  # fmt: skip

    return make


def report(timings: list[JobTiming], n_grid: int, args) -> None:
    print(f"\n{'model':<18}{'cell':<18}{'dim':>7}{'embedded':>10}{'img/s':>9}"
          f"{'embed s (full)':>16}{'search s':>10}")  # fmt: skip
    for t in timings:
        print(f"{t.model:<18}{t.cell:<18}{t.dim:>7}{t.embedded:>10}{t.images_per_second:>9.3g}"
              f"{t.embed_seconds_full:>16.1f}{t.search_seconds:>10.2f}")  # fmt: skip
    print("\nimages/s per extractor and size (embedded images / measured seconds)")
    groups: dict[tuple[str, str, int], list[JobTiming]] = {}
    for t in timings:
        flag, size = parse_cell(t.cell)
        groups.setdefault((t.model, "3D" if catalog.is_3d(flag) else "2D", size), []).append(t)
    for (model, kind, size), ts in sorted(groups.items()):
        rate = sum(t.embedded for t in ts) / sum(t.embed_seconds for t in ts)
        unit = "volumes/s" if kind == "3D" else "images/s"
        print(f"  {model:<18} {kind} {size:>4} px  {rate:9.3g} {unit}")
    embed_h = sum(t.embed_seconds_full for t in timings) / 3600
    search_h = sum(t.search_seconds for t in timings) / 3600
    print(
        f"\n{len(timings)} of {n_grid} grid jobs, fraction {args.fraction}, search {args.search}, "
        f"device {args.device} ({args.precision}, workers {args.workers}, "
        f"pin_memory {args.pin_memory}, batch {args.batch}):\n"
        f"  projected device-hours: embedding {embed_h:.3f} + search {search_h:.3f} = "
        f"{embed_h + search_h:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", *AUTOCAST_DTYPES])
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--pin-memory", action="store_true")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--search", default="full", choices=["full", "fraction"])
    parser.add_argument("--models", help="comma-separated subset of the grid's models")
    parser.add_argument("--cells", help="comma-separated subset of the grid's cells")
    parser.add_argument("--json", type=Path, help="also write every job's timings here")
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.device == "cpu" and args.precision == "16-mixed":
        parser.error("--precision 16-mixed needs --device cuda (use bf16-mixed on a CPU)")
    args.channels_last = {"true": True, "false": False}.get(args.channels_last, "auto")
    grid_models, grid_cells = paper_grid()
    models = args.models.split(",") if args.models else grid_models
    cells = args.cells.split(",") if args.cells else grid_cells
    unknown = sorted(set(models) - set(grid_models)) + sorted(set(cells) - set(grid_cells))
    if unknown:
        parser.error(f"not in the paper grid: {', '.join(unknown)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("cbmir").setLevel(logging.WARNING)
    torch.manual_seed(0)

    timings: list[JobTiming] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            make = embedders(model, args)
            for cell in cells:
                timings.append(run_job(model, make, cell, Path(tmp), args))
                t = timings[-1]
                print(f"{model} {cell}: {t.embedded} images in {t.embed_seconds:.2f}s "
                      f"({t.images_per_second:.3g}/s), search {t.search_seconds:.2f}s",
                      flush=True)  # fmt: skip
    report(timings, len(grid_models) * len(grid_cells), args)
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in timings], indent=2))


if __name__ == "__main__":
    main()
