"""Query files -> items shaped exactly like the database's stored images.

The extractor must see a query the way it saw the database: same channels, same size, uint8.
Policy (docs/query.md), chosen so that a query goes through the identical preprocessing path:

- channels: an RGB file for a grayscale database becomes grayscale (ITU-R 601 luma, PIL's "L"),
  a grayscale file for an RGB database is repeated to 3 channels; alpha is dropped. Each with a
  note.
- size: resized to the database's size (bicubic; trilinear for volumes) with a warning, since
  the database was embedded at that size and size changes CNN features.
- bit depth: 16-bit/float pictures are rescaled from their own range to 0..255 with a note;
  `.npy` arrays follow the data-file rule (uint8; other integers in [0, 255]; floats in [0, 1]
  are scaled by 255, floats in [0, 255] rounded).
- dimensionality cannot be adapted: a 2D picture for a 3D database (or a volume for a 2D one)
  is an error.

`strict=True` rejects anything that would need adapting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cbmir.errors import DataError

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy",)


@dataclass(frozen=True)
class ItemSpec:
    """What one database item looks like: (C, H, W) for 2D, (D, H, W) for volumes."""

    shape: tuple[int, ...]
    volume: bool

    def describe(self) -> str:
        if self.volume:
            return "volumes " + " x ".join(map(str, self.shape))
        c, h, w = self.shape
        return f"{'grayscale' if c == 1 else 'RGB'} images {h} x {w}"


@dataclass
class QueryItem:
    """A query ready to embed: uint8 tensor of the database's item shape."""

    name: str
    image: torch.Tensor
    label: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


class _Adapter:
    """Collects notes, or raises in strict mode, for every change made to a query."""

    def __init__(self, source: str, strict: bool) -> None:
        self.source, self.strict, self.notes = source, strict, []

    def change(self, what: str) -> None:
        if self.strict:
            raise DataError(f"{self.source}: {what} is needed; --strict forbids adapting queries")
        self.notes.append(what)


def load_query(
    path: str | Path,
    spec: ItemSpec,
    strict: bool = False,
    window: tuple[float, float] | None = None,
) -> QueryItem:
    """Read a picture, DICOM (file or series folder), NIfTI or `.npy` file and adapt it to
    `spec` (see the module's policy). DICOM and NIfTI go through the collections' readers
    (`cbmir.data.decode`, with the database's `data.window`), so a query file is decoded as the
    same file in the database was."""
    from cbmir.data.decode import kind_of, read_item

    path = Path(path)
    if not path.exists():
        raise DataError(f"query file {path} does not exist")
    suffix = path.suffix.lower()
    adapter = _Adapter(str(path), strict)
    kind = kind_of(path)
    if kind != "picture":  # dicom, dicom_series, nifti
        image = _from_array(read_item(path, window), spec, adapter)
    elif suffix in ARRAY_SUFFIXES:
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path} is not a readable .npy array ({exc})") from None
        image = _from_array(array, spec, adapter)
    elif suffix in PICTURE_SUFFIXES:
        if spec.volume:
            raise DataError(
                f"{path} is a 2D picture but the database holds {spec.describe()}; pass the "
                "query volume as a .npy array (D x H x W)"
            )
        try:
            with Image.open(path) as opened:
                opened.load()
                picture = opened.copy()
        except OSError as exc:
            raise DataError(f"{path} is not a readable picture ({exc})") from None
        image = _from_picture(picture, spec, adapter)
    else:
        raise DataError(
            f"{path}: unsupported query file type {suffix or '(none)'}; use a picture "
            f"({', '.join(PICTURE_SUFFIXES)}), DICOM, NIfTI or a .npy array"
        )
    return QueryItem(name=path.name, image=image, notes=adapter.notes)


def to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    """The data-file rule: uint8 kept, integers in [0, 255] cast, floats [0, 1] x 255 or
    [0, 255] rounded; anything else is an error naming the range found."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind not in "iuf":
        raise DataError(f"{source}: images must be numeric, got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{source}: the image holds NaN or Inf values")
    lo, hi = float(array.min(initial=0)), float(array.max(initial=0))
    if array.dtype.kind == "f" and lo >= 0 and hi <= 1:
        return np.rint(array * 255.0).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return (
            np.rint(array).astype(np.uint8) if array.dtype.kind == "f" else array.astype(np.uint8)
        )
    raise DataError(
        f"{source}: values lie in [{lo:g}, {hi:g}]; images must be uint8, integers in [0, 255] "
        "or floats in [0, 1] / [0, 255]. Rescale it first (the right mapping depends on the "
        "modality)."
    )


def _from_array(array: np.ndarray, spec: ItemSpec, adapter: _Adapter) -> torch.Tensor:
    source = adapter.source
    if spec.volume:
        squeezed = array
        while squeezed.ndim > 3 and 1 in (squeezed.shape[0], squeezed.shape[-1]):
            squeezed = squeezed[0] if squeezed.shape[0] == 1 else squeezed[..., 0]
        if squeezed.ndim != 3:
            raise DataError(
                f"{source}: array of shape {array.shape} is not one volume (D x H x W); the "
                f"database holds {spec.describe()}"
            )
        return _fit_volume(to_uint8(squeezed, source), spec, adapter)
    if array.ndim == 2:
        hwc = array[..., None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        hwc = array
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4):
        hwc = np.moveaxis(array, 0, -1)
    else:
        what = "a volume or a stack" if array.ndim >= 3 else "not an image"
        raise DataError(
            f"{source}: array of shape {array.shape} is {what}; the database holds "
            f"{spec.describe()}, so pass one image (H x W, H x W x C or C x H x W, C = 1 or 3)"
        )
    hwc = to_uint8(hwc, source)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[hwc.shape[-1]]
    picture = Image.fromarray(np.ascontiguousarray(hwc[..., 0] if mode == "L" else hwc), mode)
    return _from_picture(picture, spec, adapter)


def _from_picture(picture: Image.Image, spec: ItemSpec, adapter: _Adapter) -> torch.Tensor:
    channels, height, width = spec.shape
    if picture.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(picture, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        adapter.change(f"{picture.mode} picture rescaled from [{lo:g}, {hi:g}] to [0, 255]")
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        picture = Image.fromarray(np.rint(scaled).astype(np.uint8), "L")
    if picture.mode == "1":
        picture = picture.convert("L")
    elif picture.mode in ("P", "PA"):
        keep_alpha = picture.mode == "PA" or "transparency" in picture.info
        picture = picture.convert("RGBA" if keep_alpha else "RGB")
    elif picture.mode not in ("L", "LA", "RGB", "RGBA"):
        picture = picture.convert("RGB")  # CMYK, YCbCr, ...: as colour
    if picture.mode in ("LA", "RGBA"):
        adapter.change(f"{picture.mode} picture: alpha channel dropped")
        picture = picture.convert(picture.mode[:-1] if picture.mode == "LA" else "RGB")
    if channels == 1 and picture.mode == "RGB":
        rgb = np.asarray(picture)
        grey = bool((rgb == rgb[..., :1]).all())
        how = "its channels are equal: lossless" if grey else "ITU-R 601 luma"
        adapter.change(f"RGB picture converted to grayscale ({how})")
        picture = picture.convert("L")
    elif channels == 3 and picture.mode == "L":
        adapter.change("grayscale picture repeated to 3 channels")
        picture = picture.convert("RGB")
    if picture.size != (width, height):
        adapter.change(
            f"resized from {picture.width} x {picture.height} to {width} x {height} px "
            "(the database's size; bicubic)"
        )
        picture = picture.resize((width, height), Image.Resampling.BICUBIC)
    array = np.array(picture, dtype=np.uint8)  # a writable copy for torch
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    return torch.from_numpy(np.ascontiguousarray(array))


def _fit_volume(volume: np.ndarray, spec: ItemSpec, adapter: _Adapter) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(volume))
    if tuple(volume.shape) != tuple(spec.shape):
        adapter.change(
            f"volume resized from {' x '.join(map(str, volume.shape))} to "
            f"{' x '.join(map(str, spec.shape))} (the database's size; trilinear)"
        )
        resized = F.interpolate(
            tensor[None, None].float(),
            size=tuple(spec.shape),
            mode="trilinear",
            align_corners=False,
        )[0, 0]
        tensor = resized.round().clamp(0, 255).to(torch.uint8)
    return tensor


def spec_of(image_shape: tuple[int, ...], volume: bool) -> ItemSpec:
    """ItemSpec from a DataModule's `image_shape` and `is_volume`."""
    return ItemSpec(tuple(int(s) for s in image_shape), bool(volume))
