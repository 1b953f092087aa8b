"""Batched, on-device equivalents of the models' own PIL/torchvision eval transforms.

Foundation models ship eval transforms that work image by image on PIL images:
`Resize(shortest side) -> CenterCrop -> ToTensor -> Normalize` (open_clip, timm, CONCH), or
MedCLIP's `pad to a square canvas -> Resize -> CenterCrop` on a grayscale image. `ModelTransform`
does the same on whole uint8 batches [B, C, H, W] on the model's device:

- `resize_mode="shortest"`: resize the shortest side to `input_size / crop_pct`, keep the aspect
  ratio, centre-crop `input_size` (open_clip `resize_mode='shortest'`, timm `crop_mode='center'`).
  For square images (all of MedMNIST) this is a plain resize to `input_size`.
- `resize_mode="squash"`: resize straight to `input_size` x `input_size`.
- `resize_mode="pad"`: MedCLIP's processor: paste the image centred on a black square canvas of
  side max(input_size, H, W) (smaller images are *not* upsampled), then resize to `input_size`.

Resizing emulates PIL on uint8 images (separable antialiased passes, rounded to uint8 after
each), matching `Image.resize` to within one grey level. `grayscale=True` converts RGB with PIL's 'L' (ITU-R 601-2 luma) formula before resizing
and repeats the result over the network's 3 channels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

RESIZE_MODES = ("shortest", "squash", "pad")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """PIL-like resize of a float batch in [0, 1] holding uint8 levels.

    PIL resamples uint8 images in two separable passes (horizontal, then vertical) with
    antialiased filters, rounding to uint8 after each pass; doing the same here matches
    `Image.resize` to within one grey level (usually exactly), where a single 2-D
    interpolation differs by up to ~20 levels on high-frequency content.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if interpolation not in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=interpolation)
    y = x * 255.0
    if w != size[1]:
        y = F.interpolate(
            y, size=(h, size[1]), mode=interpolation, align_corners=False, antialias=True
        )
        y = torch.floor(y + 0.5).clamp_(0.0, 255.0)
    if h != size[0]:
        y = F.interpolate(
            y, size=(size[0], size[1]), mode=interpolation, align_corners=False, antialias=True
        )
        y = torch.floor(y + 0.5).clamp_(0.0, 255.0)
    return y / 255.0


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop offsets (round((H - size) / 2))."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if h < size or w < size:  # torchvision pads with zeros first
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = x.shape[-2:]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def shortest_side_size(h: int, w: int, target: int) -> tuple[int, int]:
    """torchvision `Resize(int)`: the short side becomes `target`, the long side scales."""
    if h <= w:
        return target, int(target * w / h)
    return int(target * h / w), target


def pil_luma(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [B, 3, H, W] -> uint8 [B, 1, H, W] exactly as PIL's `convert('L')`."""
    rgb = images.to(torch.int32)
    luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
    return luma.unsqueeze(1).to(torch.uint8)


def model_resize(
    x: torch.Tensor, size: int, mode: str, interpolation: str, crop_pct: float = 1.0
) -> torch.Tensor:
    h, w = x.shape[-2:]
    if mode == "squash":
        return resize(x, (size, size), interpolation)
    if mode == "pad":
        side = max(size, h, w)
        if (h, w) != (side, side):
            top, left = int((side - h) / 2), int((side - w) / 2)
            x = F.pad(x, (left, side - w - left, top, side - h - top), value=0.0)
        return center_crop(resize(x, (size, size), interpolation), size)
    scale = math.floor(size / crop_pct) if crop_pct else size
    x = resize(x, shortest_side_size(h, w, scale), interpolation)
    return center_crop(x, size)


class ModelTransform:
    """Mixin for `Extractor` subclasses: replaces `preprocess` with the model's own eval
    transform. Needs `input_size`, `interpolation`, `_mean`, `_std` (from `Extractor`) and sets
    `resize_mode`, `crop_pct`, `grayscale`."""

    resize_mode: str = "shortest"
    crop_pct: float = 1.0
    grayscale: bool = False

    def _set_transform(
        self, resize_mode: str = "shortest", crop_pct: float | None = 1.0, grayscale: bool = False
    ) -> None:
        from cbmir.config import check_choice
        from cbmir.errors import ConfigError

        check_choice(resize_mode, RESIZE_MODES, "resize_mode")
        check_choice(self.interpolation, INTERPOLATIONS, "interpolation")  # type: ignore[attr-defined]
        if crop_pct is not None and not 0 < float(crop_pct) <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.resize_mode = resize_mode
        self.crop_pct = float(crop_pct) if crop_pct is not None else 1.0
        self.grayscale = bool(grayscale)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(images.shape)}")
        if self.grayscale and images.shape[1] == 3:
            images = (
                pil_luma(images) if images.dtype == torch.uint8 else images.mean(1, keepdim=True)
            )
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1 and not self.grayscale:
            x = x.expand(-1, 3, -1, -1)
        size = self.input_size  # type: ignore[attr-defined]
        if size is not None:
            x = model_resize(x, int(size), self.resize_mode, self.interpolation, self.crop_pct)  # type: ignore[attr-defined]
        if self._mean.numel():  # type: ignore[attr-defined]
            x = (x - self._mean.to(x.device)) / self._std.to(x.device)  # type: ignore[attr-defined]
        if self.grayscale:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous()

    def transform_identity(self) -> dict[str, Any]:
        return {
            "resize_mode": self.resize_mode,
            "crop_pct": self.crop_pct,
            "grayscale": self.grayscale,
        }
