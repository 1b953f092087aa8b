"""MedMNIST, custom-npz and own-collection data: catalog facts, file handling, datasets and DataModules.

Exports resolve lazily so that `cbmir.data.catalog` can be imported without Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ArraySplitDataset": "cbmir.data.datasets",
    "CollectionDataModule": "cbmir.data.collection_module",
    "MedMNISTDataModule": "cbmir.data.datamodule",
    "NpzDataModule": "cbmir.data.datamodule",
    "RetrievalDataModule": "cbmir.data.datamodule",
    "check_flag_size": "cbmir.data.catalog",
    "convert_npz_to_npy": "cbmir.data.files",
    "write_digits_npz": "cbmir.data.synthetic",
    "write_synthetic_medmnist": "cbmir.data.synthetic",
}
__all__ = [
    "ArraySplitDataset",
    "CollectionDataModule",
    "MedMNISTDataModule",
    "NpzDataModule",
    "RetrievalDataModule",
    "check_flag_size",
    "convert_npz_to_npy",
    "write_digits_npz",
    "write_synthetic_medmnist",
]

if TYPE_CHECKING:
    from cbmir.data.catalog import check_flag_size
    from cbmir.data.collection_module import CollectionDataModule
    from cbmir.data.datamodule import MedMNISTDataModule, NpzDataModule, RetrievalDataModule
    from cbmir.data.datasets import ArraySplitDataset
    from cbmir.data.files import convert_npz_to_npy
    from cbmir.data.synthetic import write_digits_npz, write_synthetic_medmnist


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cbmir.data' has no attribute {name!r}")
