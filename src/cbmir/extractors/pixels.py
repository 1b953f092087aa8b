"""Raw pixels as the embedding: the no-learning baseline every retrieval table needs."""

from __future__ import annotations

from typing import Any

import torch

from .base import Extractor


class PixelExtractor(Extractor):
    """Flattened pixels scaled to [0, 1], no resizing and no normalisation.

    `pretrained` and `seed` are accepted (and ignored: no weights) so that sweeps can pass
    `model.pretrained=false` and the config's `model.seed` to every extractor alike.
    """

    name = "pixels"

    def __init__(self, pretrained: bool = True, name: str = "pixels", seed: int = 0) -> None:
        del pretrained, seed
        super().__init__(mean=None, std=None)
        self.name = name
        self.in_chans = 0  # keep the input's own channels

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def output_dim(self, image_shape: tuple[int, ...] | None = None) -> int:
        if image_shape is None:
            raise ValueError("the pixel extractor's dimension depends on the image shape")
        dim = 1
        for side in image_shape:
            dim *= int(side)
        return dim

    def identity(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "name": self.name}
