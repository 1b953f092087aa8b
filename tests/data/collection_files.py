"""Real collection files for tests, written offline by the fields' libraries: scikit-learn's
digits (8 x 8, upscaled to 28 px) as PNG class folders, CSV tables, 8- and 16-bit DICOM
(pydicom) and NIfTI volumes (nibabel), plus the `.npz` of the very same arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SPLIT_OF = {"train": 0, "test": 1}


def digits(n: int = 90, size: int = 28) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images n x size x size uint8, labels n, splits): the first n digits, every third one a
    test image; only the digits 0-4 so that every class is in train and test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.flatnonzero(data.target < 5)[:n]
    small = torch.from_numpy(data.images[keep].astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    images = (big[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    splits = ["test" if i % 3 == 0 else "train" for i in range(len(keep))]
    return images, data.target[keep].astype(np.int64), splits


def volumes(n: int = 40, depth: int = 6) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n digit volumes depth x 28 x 28: the digit fading in slice by slice."""
    images, labels, splits = digits(n)
    ramp = (np.arange(1, depth + 1) / depth)[None, :, None, None]
    vols = np.rint(images[:, None].astype(np.float64) * ramp).astype(np.uint8)
    return vols, labels, splits


def stored_order(paths: list[str]) -> np.ndarray:
    """The order a folder collection stores its rows in: sorted paths."""
    return np.argsort(np.asarray(paths), kind="stable")


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray, splits: list[str]) -> Path:
    """The MedMNIST-layout npz of the same items, split by split in the given order."""
    arrays = {}
    for split in ("train", "test"):
        idx = [i for i, s in enumerate(splits) if s == split]
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx][:, None]
    np.savez(path, **arrays)
    return path


def item_name(i: int, label: int, split: str, suffix: str) -> str:
    return f"{split}/{label}/{i:04d}{suffix}"


def write_png_tree(
    root: Path, images: np.ndarray, labels: np.ndarray, splits: list[str]
) -> list[str]:
    """root/<split>/<class>/<i>.png; returns the relative paths (item order)."""
    names = []
    for i, (image, label, split) in enumerate(zip(images, labels, splits, strict=True)):
        name = item_name(i, int(label), split, ".png")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / name)
        names.append(name)
    return names


def write_table(path: Path, names: list[str], labels, splits: list[str], sep: str = ",") -> Path:
    lines = [sep.join(("path", "label", "split"))]
    lines += [sep.join((n, str(lab), s)) for n, lab, s in zip(names, labels, splits, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_dicom(path: Path, pixels: np.ndarray, with_pixels: bool = True, **tags) -> Path:
    """A single-frame grey DICOM file (Secondary Capture, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = tags.pop("PhotometricInterpretation", "MONOCHROME2")
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    for name, value in tags.items():
        setattr(ds, name, value)
    if with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# 16-bit: stored v * 257 (full range), modality 2x - 100, and a window over the whole modality
# range: the documented mapping gives back exactly v (docs/data.md, "DICOM").
DICOM16_TAGS = {
    "RescaleSlope": 2,
    "RescaleIntercept": -100,
    "WindowCenter": 65435.5,
    "WindowWidth": 131071,
}


def write_dicom_tree(
    root: Path, images: np.ndarray, labels: np.ndarray, splits: list[str], bits: int
) -> list[str]:
    names = []
    for i, (image, label, split) in enumerate(zip(images, labels, splits, strict=True)):
        name = item_name(i, int(label), split, ".dcm")
        if bits == 16:
            write_dicom(root / name, image.astype(np.uint16) * 257, **DICOM16_TAGS)
        else:
            write_dicom(root / name, image)
        names.append(name)
    return names


def write_nifti_tree(
    root: Path, vols: np.ndarray, labels: np.ndarray, splits: list[str]
) -> list[str]:
    """One .nii.gz per volume, identity affine (already RAS): array axes = stored axes."""
    import nibabel as nib

    names = []
    for i, (vol, label, split) in enumerate(zip(vols, labels, splits, strict=True)):
        name = item_name(i, int(label), split, ".nii.gz")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), root / name)
        names.append(name)
    return names


def sorted_items(names: list[str], *arrays):
    """The arrays in a folder collection's stored order (sorted paths)."""
    order = stored_order(names)
    return [[a[i] for i in order] if isinstance(a, list) else a[order] for a in arrays]
