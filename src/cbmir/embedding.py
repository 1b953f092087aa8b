"""Frozen-backbone LightningModule and the prediction writer that fills the embedding store."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter

from cbmir.config import (
    check_embedder_config,
    embedder_config,
    numeric_precision,
    parse_channels_last,
)
from cbmir.errors import EmbeddingError
from cbmir.extractors.base import Extractor
from cbmir.store import EmbeddingStore, EntryWriter, make_key
from cbmir.volumes import VolumeSpec, embed_volumes


class FrozenEmbedder(L.LightningModule):
    """Runs an `Extractor` in eval mode without gradients; `predict_step` -> float32 [B, D].

    Precision (fp32, bf16-mixed, 16-mixed) comes from the Trainer, so the same module serves
    CPU runs and autocast GPU runs; pass the Trainer's `precision` here too, because anything
    but float32 changes the numbers and so joins the embedding-store key (a bf16 run must not
    reuse float32 embeddings or the reverse). `channels_last` is speed only (conv nets, mostly
    on GPUs) and stays out of the key. With `volume` set, inputs are volumes [B, D, H, W]: their
    slices go through the 2D extractor in batches and are assembled per volume
    (`cbmir.volumes`); the volume settings then join the embedding-store key.
    """

    def __init__(
        self,
        extractor: Extractor,
        channels_last: bool | str = False,
        volume: VolumeSpec | None = None,
        precision: str | int = "32-true",
    ) -> None:
        super().__init__()
        self.extractor = extractor.freeze()
        self.channels_last = resolve_channels_last(channels_last, extractor)
        self.volume = volume
        self.precision = numeric_precision(precision)

    def on_predict_start(self) -> None:
        self.extractor.freeze()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.extractor.to(memory_format=memory_format)  # a no-op when already in that format

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, C, H, W] (volumes [B, D, H, W] when `volume` is set) -> [B, dim]."""
        if self.volume is not None:
            return embed_volumes(images, self._embed_2d, self.volume)
        return self._embed_2d(images)

    def _embed_2d(self, images: torch.Tensor) -> torch.Tensor:
        x = self.extractor.preprocess(images)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.extractor.embed(x)

    def output_dim(self, image_shape: tuple[int, ...]) -> int:
        """Embedding size for one item of `image_shape` ((C, H, W), or (D, H, W) for volumes)."""
        if self.volume is not None:
            return self.volume.output_dim(image_shape, self.extractor.output_dim)
        return self.extractor.output_dim(image_shape)

    def store_key(self, data_identity: dict[str, Any]) -> str:
        """Embedding-store key of this embedder on one split: extractor (+ volume settings)."""
        extra: dict[str, Any] = {}
        if self.volume is not None:
            extra["volume"] = self.volume.identity()
        if self.precision is not None:  # float32 keys stay as they were
            extra["precision"] = self.precision
        return make_key(self.extractor.identity(), data_identity, **extra)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        return self.embed_images(batch["image"]).float()


def build_embedder(cfg: Any, extractor: Extractor, volume: VolumeSpec | None) -> FrozenEmbedder:
    """`instantiate(cfg.embedder)` around `extractor`; `volume` only for volume data, so 2D
    store keys stay free of the volume settings. Both go to the built partial, not through
    instantiate, which would turn the `VolumeSpec` dataclass into a DictConfig."""
    check_embedder_config(cfg)
    build = instantiate(embedder_config(cfg), _partial_=True)
    return build(extractor=extractor, volume=volume)


def is_conv_net(module: torch.nn.Module) -> bool:
    """True for convolutional backbones (ResNet, DenseNet, VGG, EfficientNet, ConvNeXt), whose
    many 2D convolutions gain from channels_last; ViTs and Swin have one (the patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules()) > 2


def resolve_channels_last(setting: bool | str, extractor: torch.nn.Module) -> bool:
    """`channels_last`: true / false, or "auto" (on for conv nets, see `is_conv_net`)."""
    setting = parse_channels_last(setting)
    return is_conv_net(extractor) if setting == "auto" else bool(setting)


@contextlib.contextmanager
def _quiet_trainer_start() -> Iterator[None]:
    """Hide the Trainer's start-up banner (devices, tips): a helper call is not a run."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def embed_items(
    embedder: FrozenEmbedder,
    images: Sequence[torch.Tensor],
    precision: str | int = "32-true",
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """uint8 items (one shape) -> float32 [N, D], through `Trainer.predict` as a run embeds.

    The one embedding path beside the pipeline's (query embedding, benchmarks): the same
    `predict_step` under the Trainer's own precision plugin and inference mode, so a query is
    embedded exactly as the database was (Lightning's CPU fallback of 16-mixed to bf16
    included), never by a hand-made imitation of it.
    """
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else 1
    items = [{"image": torch.as_tensor(image)} for image in images]  # as DataModules yield
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size)
    with _quiet_trainer_start():
        trainer = L.Trainer(
            accelerator=device.type,
            devices=devices,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        batches = trainer.predict(embedder, loader, return_predictions=True)
    return torch.cat([batch.cpu() for batch in batches]).numpy()


@dataclass
class PlannedEntry:
    """One split to embed: where it goes in the store and what it holds."""

    split: str
    key: str
    n_rows: int
    dim: int
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


class EmbeddingStoreWriter(BasePredictionWriter):
    """Writes each predict dataloader's embeddings into its store entry, batch by batch.

    Each entry is published as soon as its last row is written, so a run that dies while
    embedding the database split keeps the finished query split. On any exception the entries
    not yet published are deleted, so nothing half-written survives.
    """

    def __init__(self, store: EmbeddingStore, plan: list[PlannedEntry]) -> None:
        super().__init__(write_interval="batch")
        self.store = store
        self.plan = plan
        self.writers: list[EntryWriter | None] = []
        self.seconds: dict[str, float] = {}
        self._last_end = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writers = [
            self.store.open_writer(p.key, p.n_rows, p.dim, p.labels, {**p.meta, "dim": p.dim})
            for p in self.plan
        ]
        self._last_end = time.perf_counter()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: torch.Tensor,
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        rows = batch["index"].detach().cpu().numpy()
        self._write_rows(trainer, dataloader_idx, rows, prediction.detach().cpu().numpy())

    def _write_rows(
        self, trainer: L.Trainer, index: int, rows: np.ndarray, values: np.ndarray
    ) -> None:
        """One batch's rows into entry `index` (under DDP each rank writes shards instead)."""
        writer = self.writers[index]
        if writer is None:
            raise EmbeddingError(
                f"predict dataloader {index} yielded rows after its entry was complete"
            )
        writer.write(rows, values)
        if writer.complete:
            self._publish(index)

    def _publish(self, index: int, end: float | None = None) -> None:
        """Publish one finished entry; dataloaders run one after another, so its time runs
        from the previous one's end to `end` (None: now)."""
        writer, planned = self.writers[index], self.plan[index]
        assert writer is not None
        end = time.perf_counter() if end is None else end
        writer.meta["embed_seconds"] = self.seconds[planned.split] = end - self._last_end
        writer.commit()
        self.writers[index] = None
        self._last_end = end

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every entry is complete by now; one that is not raises (rows never embedded)
        for index, writer in enumerate(self.writers):
            if writer is not None:
                self._publish(index)
        self.writers = []

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._abort_all()

    def _abort_all(self) -> None:
        """Delete every entry not yet published: nothing half-written survives."""
        for writer in self.writers:
            if writer is not None:
                writer.abort()
        self.writers = []
