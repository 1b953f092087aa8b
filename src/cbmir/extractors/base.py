"""The one interface every feature extractor implements.

The pipeline only ever sees an `Extractor`: it hands it a batch of raw uint8 images
([B, C, H, W], C = 1 or 3) and gets back float embeddings [B, D]. Preprocessing runs on
whole batches on the model's device (not image by image through PIL), so data loading stays
cheap and the same code runs on CPU and GPU.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Extractor(nn.Module, ABC):
    """A frozen image encoder with its own preprocessing.

    Subclasses build their network in `__init__`, describe it in `identity()` (everything that
    changes an embedding: it keys the embedding store) and implement `embed`.
    """

    #: short name used in run names and store keys (e.g. "resnet50")
    name: str = "extractor"
    #: channels the network expects; grayscale inputs are repeated to match
    in_chans: int = 3
    #: random weights only (`pretrained=false`): their init scheme and seed
    #: (`random_init.random_identity`), part of the identity; None for loaded weights
    random_init: dict[str, Any] | None = None

    def __init__(
        self,
        *,
        input_size: int | None = None,
        min_size: int | None = None,
        mean: tuple[float, ...] | None = IMAGENET_MEAN,
        std: tuple[float, ...] | None = IMAGENET_STD,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.min_size = min_size
        self.interpolation = interpolation
        self.register_buffer("_mean", _channel_vector(mean), persistent=False)
        self.register_buffer("_std", _channel_vector(std), persistent=False)

    # -- preprocessing -------------------------------------------------------------------
    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size the network sees: fixed `input_size`, else the image's own size
        raised to `min_size` (the paper upsized 28 px to 32 px for its CNNs)."""
        if self.input_size is not None:
            return (self.input_size, self.input_size)
        if self.min_size is not None and min(height, width) < self.min_size:
            scale = self.min_size / min(height, width)
            return (round(height * scale), round(width * scale))
        return (height, width)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> normalised float [B, in_chans, h, w] on the same device."""
        if images.ndim != 4:
            raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.in_chans == 1:
            x = x.mean(dim=1, keepdim=True)
        size = self.target_size(x.shape[-2], x.shape[-1])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False)
        if self._mean.numel():
            x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x.contiguous()

    # -- embedding -----------------------------------------------------------------------
    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch -> embeddings [B, D]."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.preprocess(images))

    @abstractmethod
    def output_dim(self, image_shape: tuple[int, ...] | None = None) -> int:
        """Embedding dimension, known without running the network.

        `image_shape` is (C, H, W) of the raw input; only extractors whose dimension depends
        on the input (raw pixels) need it.
        """

    def identity(self) -> dict[str, Any]:
        """Everything that changes an embedding; subclasses extend it with weights."""
        ident = {
            "class": type(self).__name__,
            "name": self.name,
            "in_chans": self.in_chans,
            "input_size": self.input_size,
            "min_size": self.min_size,
            "interpolation": self.interpolation,
            "mean": [round(v, 6) for v in self._mean.flatten().tolist()],
            "std": [round(v, 6) for v in self._std.flatten().tolist()],
        }
        # random weights are a function of their seed and init scheme: both key the store
        return {**ident, **(self.random_init or {})}

    def freeze(self) -> Extractor:
        """Eval mode and no gradients: a frozen feature extractor (dropout off, BN stats fixed)."""
        return self.eval().requires_grad_(False)


def _channel_vector(values: tuple[float, ...] | None) -> torch.Tensor:
    if values is None:
        return torch.empty(0)
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Content hash of a weights file, so a new checkpoint never reuses old embeddings."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
