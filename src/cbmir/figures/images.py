"""Stored items (what the extractor sees) -> 2D pictures a person can look at."""

from __future__ import annotations

import numpy as np
import torch


def display_image(image: np.ndarray | torch.Tensor, volume: bool) -> np.ndarray:
    """One item, (C, H, W) for 2D or (D, H, W) for volumes, -> uint8 H x W or H x W x 3.

    Volumes show their middle slice along the first axis (the axis the extractors slice), since
    a single picture per case is what fits in a grid cell.
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"expected an item (C, H, W) or (D, H, W), got shape {array.shape}")
    if volume:
        picture = array[array.shape[0] // 2]
    elif array.shape[0] == 1:
        picture = array[0]
    elif array.shape[0] == 3:
        picture = np.moveaxis(array, 0, -1)
    else:
        raise ValueError(f"a 2D item has 1 or 3 channels, got shape {array.shape}")
    if picture.dtype != np.uint8:
        picture = np.clip(np.rint(picture.astype(np.float64)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(picture)
