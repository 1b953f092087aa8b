"""A torch Dataset over one memory-mapped split.

Items stay uint8 at their stored size: resizing and normalisation belong to each extractor and run
on whole batches on the device, which is far cheaper than per-item CPU transforms.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cbmir.errors import DataError


class ArraySplitDataset(Dataset):
    """Items `{"image": uint8 [C,H,W] or [D,H,W], "label": int64 [L], "index": int}`.

    `images`: N x H x W (grey), N x H x W x 3 (RGB) or N x D x H x W (volumes), usually an
    `np.memmap`. `volume` resolves N x D x H x 3 arrays; None decides by shape (last dim 3: RGB).
    Pickling (spawned DataLoader workers) re-opens a memmap by file name instead of copying it,
    and refuses a file that is no longer the one opened here (a concurrent run re-converted it).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, volume: bool | None = None):
        labels = np.asarray(labels)
        labels = labels.reshape(len(labels), -1) if labels.ndim == 1 else labels
        if images.ndim not in (3, 4) or labels.ndim != 2:
            raise DataError(
                f"Expected images N x H x W, N x H x W x 3 or N x D x H x W and labels N x L; "
                f"got images {images.shape} and labels {labels.shape}."
            )
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels; they must match.")
        if volume is None:
            volume = images.ndim == 4 and images.shape[-1] != 3
        if not volume and images.ndim == 4 and images.shape[-1] != 3:
            raise DataError(f"volume=False but images {images.shape} are not N x H x W x 3.")
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.volume = bool(volume)
        self._file_id = _file_id(images)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one returned image tensor: (C, H, W) or (D, H, W)."""
        shape = self.images.shape[1:]
        if self.volume:
            return tuple(shape)
        return (1, *shape) if len(shape) == 2 else (shape[2], shape[0], shape[1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        # np.array copies out of the memmap: the batch then owns its memory
        image = torch.from_numpy(np.array(self.images[index], dtype=np.uint8))
        if not self.volume:
            image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1).contiguous()
        return {
            "image": image,
            "label": torch.from_numpy(self.labels[index].copy()),
            "index": int(index),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        images = self.images
        if isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap):
            state["images"] = {
                "memmap": str(images.filename),
                "dtype": images.dtype.str,
                "shape": images.shape,
                "offset": images.offset,
                "order": "F"
                if images.flags.f_contiguous and not images.flags.c_contiguous
                else "C",
                "file_id": self._file_id,
            }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        spec = state["images"]
        if isinstance(spec, dict):
            with open(spec["memmap"], "rb") as fh:  # the file checked is the file mapped
                st = os.fstat(fh.fileno())
                if spec.get("file_id") not in (None, [st.st_dev, st.st_ino]):
                    raise DataError(
                        f"{spec['memmap']} was replaced while this run was using it (another "
                        f"run re-converted the data file); run again."
                    )
                state["images"] = np.memmap(
                    fh,
                    dtype=np.dtype(spec["dtype"]),
                    mode="r",
                    offset=spec["offset"],
                    shape=tuple(spec["shape"]),
                    order=spec["order"],
                )
        self.__dict__.update(state)


def _file_id(images: np.ndarray) -> list[int] | None:
    """(device, inode) of the file behind a memmap, to recognise it when re-opened by name."""
    if not (isinstance(images, np.memmap) and images.filename):
        return None
    st = os.stat(images.filename)
    return [st.st_dev, st.st_ino]
