"""Extractors for the DDP tests, importable by every rank through `model._target_`."""

from __future__ import annotations

import os

import torch

from cbmir.extractors.pixels import PixelExtractor


class FailsOnRankOne(PixelExtractor):
    """Raw pixels, except that the second DDP process fails on its first batch (a GPU that runs
    out of memory, a corrupt shard of data): the job must leave nothing in the store."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if os.environ.get("LOCAL_RANK") == "1":
            raise RuntimeError("rank 1 fails on purpose")
        return super().embed(x)
