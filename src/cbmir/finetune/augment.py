"""Light, batched augmentation on the device: a small random affine map per image.

It runs on the preprocessed (resized, normalised) batch with one `grid_sample`, so it costs
little next to the backbone. The random draws come from a generator seeded by (seed, step):
an interrupted and resumed fine-tune sees the same augmentations as an uninterrupted one.
Flips are off by default: they are not label-preserving for every data set (digits, text,
laterality).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .settings import AugmentSettings


class AffineAugment(AugmentSettings):
    """The `finetune.augment` settings (`settings.AugmentSettings`: fields and checks), applied
    to a batch."""

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        n = x.shape[0]
        g = torch.Generator().manual_seed(int(seed))
        angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(self.rotate)
        lo, hi = self.scale
        scale = lo + torch.rand(n, generator=g) * (hi - lo)
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * self.translate * 2  # grid spans [-1, 1]
        flip = (
            (torch.rand(n, generator=g) < 0.5) if self.hflip else torch.zeros(n, dtype=torch.bool)
        )
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        sx = torch.where(flip, -1.0, 1.0)
        theta = torch.stack(
            [
                torch.stack([cos * sx, -sin, shift[:, 0]], dim=1),
                torch.stack([sin * sx, cos, shift[:, 1]], dim=1),
            ],
            dim=1,
        ).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
