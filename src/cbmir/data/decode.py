"""Per-format readers of a collection's files: one file (or DICOM folder) -> a uint8 array shaped
like MedMNIST's (H x W grey, H x W x 3 RGB, D x H x W volumes).

The fields' libraries do the decoding: Pillow (PNG, JPEG, TIFF, BMP), pydicom (DICOM: modality
rescale, VOI LUT / window, photometric interpretation), nibabel (NIfTI, RAS-canonical
orientation). What is cbmir's own is the mapping to uint8 (docs/data.md):

- uint8 data (8-bit pictures, 8-bit DICOM without a window, uint8 NIfTI) is kept as is;
- `data.window=[lo, hi]`, when set, maps lo..hi linearly to 0..255 (clipped) for every file;
- else a DICOM file's own VOI LUT or window (pydicom's `apply_voi_lut`) maps its output range
  to 0..255; MONOCHROME1 is then inverted;
- anything else (16-bit, float) is scaled per image (per volume) from its own min..max.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from cbmir.errors import ConfigError, DataError

FORMAT_VERSION = 1  # of the decoding rules below; part of every collection cache key
RESIZE_POLICIES = ("squash", "pad", "shortest")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GREY_MODES = ("L", "1", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_T = TypeVar("_T")


class DecodeError(DataError):
    """One file cannot be read; collected per file so the message can list them together."""


@dataclass(frozen=True)
class DecodeSettings:
    """Everything (besides the files) that changes the decoded arrays: part of the cache key."""

    size: int | None = None
    resize: str = "squash"
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            raise ConfigError(f"data.size must be a positive integer or null, not {self.size!r}.")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(
                f"data.resize must be one of {', '.join(RESIZE_POLICIES)}, not {self.resize!r}."
            )
        if self.window is not None:
            lo, hi = (float(v) for v in self.window)
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ConfigError(
                    f"data.window must be [low, high] with low < high, not {list(self.window)!r}."
                )
            object.__setattr__(self, "window", (lo, hi))

    def identity(self) -> dict[str, Any]:
        window = list(self.window) if self.window is not None else None
        return {
            "format": FORMAT_VERSION,
            "size": self.size,
            "resize": self.resize,
            "window": window,
        }


@dataclass(frozen=True)
class Header:
    """What a file holds, read without decoding its pixels."""

    shape: tuple[int, ...]  # (H, W) or (D, H, W)
    color: bool
    volume: bool


def kind_of(path: Path) -> str:
    """picture | dicom | nifti | dicom_series (a folder of DICOM slices), by extension and
    content (a DICOM file carries `DICM` at byte 128, whatever its name)."""
    if path.is_dir():
        return "dicom_series"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PICTURE_SUFFIXES):  # no extra open for the common case
        return "picture"
    if name.endswith(".dcm") or _has_dicm(path):
        return "dicom"
    return "picture"


def picture_name(path: Path) -> bool:
    """A picture by its name: what `kind_of` says of any file so named, without a stat (only a
    folder so named is not a picture)."""
    return path.name.lower().endswith(PICTURE_SUFFIXES)


def _has_dicm(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _reading(path: Path, kind: str, read: Callable[[], _T]) -> _T:
    """`read()` of one file, its failures named after the file: DecodeError (collected per file)
    for any library's error, DataError for a decoding library that is not installed."""
    try:
        return read()
    except DecodeError:
        raise
    except ModuleNotFoundError as exc:
        raise DataError(
            f"{path} needs {exc.name}, which is not installed: pip install 'cbmir[collections]' "
            f"(pydicom, nibabel, pyarrow)."
        ) from None
    except Exception as exc:  # each library raises its own types; the file is what matters
        raise DecodeError(
            f"{path}: not a readable {kind} file ({type(exc).__name__}: {exc})"
        ) from None


# --------------------------------------------------------------------------- headers


def read_header(path: Path) -> Header:
    """The shape and colour of one item, cheaply; DecodeError when it is not readable."""
    kind = kind_of(path)
    headers = {"picture": _picture_header, "nifti": _nifti_header, "dicom": _dicom_header}
    return _reading(path, kind, lambda: headers.get(kind, _series_header)(path))


def _picture_header(path: Path) -> Header:
    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
            # multi-page TIFF/GIF; asking a PNG would make Pillow scan it for APNG frames
            frames = getattr(im, "n_frames", 1) if im.format in ("TIFF", "GIF", "MPO") else 1
    except UnidentifiedImageError:
        raise DecodeError(f"{path}: not a picture Pillow can read") from None
    if frames > 1:
        raise DecodeError(f"{path}: a multi-frame picture ({frames} frames); one image expected")
    return Header((h, w), color=mode not in _GREY_MODES, volume=False)


def _dicom_header(path: Path) -> Header:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DecodeError(
            f"{path}: a multi-frame DICOM ({frames} frames); 2D collections take single-frame "
            f"files (put a volume's slices in a folder and name the folder instead)"
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise DecodeError(f"{path}: a DICOM without an image (no Rows/Columns, no pixel data)")
    return Header((int(ds.Rows), int(ds.Columns)), int(ds.get("SamplesPerPixel", 1)) > 1, False)


def _series_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DecodeError(f"{folder}: an empty folder; a DICOM series folder holds its slices")
    return files


def _series_header(folder: Path) -> Header:
    heads = [_dicom_header(p) for p in _series_files(folder)]
    shapes = {h.shape for h in heads}
    if len(shapes) > 1 or any(h.color for h in heads):
        raise DecodeError(
            f"{folder}: its DICOM slices differ in size ({sorted(shapes)}) or "
            f"are colour; one grey volume expected"
        )
    return Header((len(heads), *heads[0].shape), color=False, volume=True)


def _nifti_header(path: Path) -> Header:
    import nibabel as nib

    img = nib.load(path)
    shape = _nifti_3d_shape(path, img.shape)
    order = nib.orientations.io_orientation(img.affine)[:, 0].astype(int)
    canonical = [0, 0, 0]
    for axis, target in enumerate(order):  # axis i of the file becomes axis order[i]
        canonical[target] = shape[axis]
    return Header(tuple(canonical), color=False, volume=True)


def _nifti_3d_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DecodeError(
            f"{path}: a {len(shape)}D NIfTI of shape {tuple(shape)}; cbmir takes 3D volumes "
            f"(split a 4D series into one file per volume)"
        )
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------- pixels


VOLUME_KINDS = ("nifti", "dicom_series")


def read_item(
    path: Path,
    window: tuple[float, float] | None,
    kind: str | None = None,
    opened: BinaryIO | None = None,
) -> np.ndarray:
    """One item as uint8: H x W, H x W x 3 or D x H x W (the module's mapping rules); `kind`
    when the caller knows it already (`kind_of`). Checks what `read_header` checks (frames,
    slices), so a decode needs no header pass. `opened`: a picture `path` already opened by
    the caller, read from it alone (the caller can then stamp the very file it read)."""
    kind = kind or kind_of(path)
    if kind == "picture":
        return _reading(path, kind, lambda: _read_picture(path, window, opened))
    read = {"nifti": _read_nifti, "dicom": _read_dicom}.get(kind, _read_series)
    return _reading(path, kind, lambda: read(path, window))


def to_uint8(array: np.ndarray, window: tuple[float, float] | None, source: Path) -> np.ndarray:
    """uint8 kept (no window); else window lo..hi -> 0..255, else the array's own min..max."""
    if window is None and array.dtype == np.uint8:
        return array
    array = np.asarray(array, dtype=np.float64)
    if not np.isfinite(array).all():
        raise DecodeError(f"{source}: the image holds NaN or Inf values")
    lo, hi = window if window is not None else (float(array.min()), float(array.max()))
    if hi <= lo:  # a constant image: black
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (array - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _read_picture(
    path: Path, window: tuple[float, float] | None, opened: BinaryIO | None = None
) -> np.ndarray:
    try:
        im = Image.open(path if opened is None else opened)
    except UnidentifiedImageError:
        raise DecodeError(f"{path}: not a picture Pillow can read") from None
    with im:
        frames = getattr(im, "n_frames", 1) if im.format in ("TIFF", "GIF", "MPO") else 1
        if frames > 1:
            raise DecodeError(
                f"{path}: a multi-frame picture ({frames} frames); one image expected"
            )
        im.load()
        if im.mode in ("1", "LA"):
            im = im.convert("L")  # alpha dropped
        elif im.mode not in _GREY_MODES and im.mode != "RGB":
            im = im.convert("RGB")  # RGBA (alpha dropped), palette, CMYK, YCbCr
        array = np.asarray(im)
    return to_uint8(array, window, path)  # RGB is uint8: kept as is without a window


def _dicom_pixels(path: Path):
    """(dataset, modality values) of one single-frame DICOM file."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError(f"{path}: a DICOM without pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DecodeError(f"{path}: a multi-frame DICOM; 2D collections take single frames")
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = apply_modality_lut(pixels, ds)
    return ds, pixels


def _dicom_window(ds, values: np.ndarray, path: Path) -> np.ndarray:
    """The file's VOI LUT or window (pydicom), its output range mapped to 0..255."""
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = apply_voi_lut(values.astype(np.int64), ds)
        return to_uint8(out, (0.0, float(2**bits - 1)), path)
    # the window's output bounds, from pydicom itself: values far below and above it
    bounds = apply_voi_lut(np.array([-1e300, 1e300]), ds, prefer_lut=False)
    return to_uint8(apply_voi_lut(values, ds, prefer_lut=False), tuple(bounds), path)


def _grey_dicom(ds, values: np.ndarray, window, path: Path) -> np.ndarray:
    if window is not None:
        out = to_uint8(values, window, path)
    elif ds.get("VOILUTSequence") or ("WindowCenter" in ds and "WindowWidth" in ds):
        out = _dicom_window(ds, values, path)
    else:
        out = to_uint8(values, None, path)
    return 255 - out if ds.get("PhotometricInterpretation") == "MONOCHROME1" else out


def _read_dicom(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    ds, values = _dicom_pixels(path)
    if values.ndim == 3:  # colour (pydicom returns RGB for YBR files)
        return to_uint8(values, window, path)
    return _grey_dicom(ds, values, window, path)


def _slice_position(ds, fallback: int) -> tuple[float, int]:
    """Where a slice lies along the series' normal (position . normal), else its number."""
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position is not None and orientation is not None:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return float(np.dot(normal, np.asarray(position, float))), fallback
    return float(ds.get("InstanceNumber", fallback) or fallback), fallback


def _read_series(folder: Path, window: tuple[float, float] | None) -> np.ndarray:
    slices = [(_dicom_pixels(p), i) for i, p in enumerate(_series_files(folder))]
    slices.sort(key=lambda item: _slice_position(item[0][0], item[1]))
    first = slices[0][0][0]
    shapes = sorted({values.shape for (_, values), _ in slices})
    if len(shapes) > 1 or len(shapes[0]) != 2:
        raise DecodeError(
            f"{folder}: its DICOM slices differ in size ({shapes}) or are colour; one grey "
            f"volume expected"
        )
    volume = np.stack([values for (_, values), _ in slices])
    return _grey_dicom(first, volume, window, folder)  # the first slice's tags for the volume


def _read_nifti(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(path))
    _nifti_3d_shape(path, img.shape)
    array = np.asanyarray(img.dataobj)
    return to_uint8(array.reshape(array.shape[:3]), window, path)


# --------------------------------------------------------------------------- sizes


def fit(array: np.ndarray, settings: DecodeSettings, color: bool, volume: bool) -> np.ndarray:
    """Resize to `settings.size` by its policy (none: unchanged) and match the collection's
    channels (a grey item of a colour collection repeated to RGB)."""
    if settings.size is not None:
        if volume:
            array = _fit_volume(array, settings.size, settings.resize)
        else:
            array = _fit_picture(array, settings.size, settings.resize)
    if color and array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def _fit_picture(array: np.ndarray, size: int, policy: str) -> np.ndarray:
    """Pillow's antialiased bicubic: squash = resize to size x size; pad = fit inside, black
    borders (`ImageOps.pad`); shortest = shortest side to size, centre crop (`ImageOps.fit`)."""
    if array.shape[:2] == (size, size):
        return array
    im = Image.fromarray(array)
    method = Image.Resampling.BICUBIC
    if policy == "squash":
        im = im.resize((size, size), method)
    elif policy == "pad":
        im = ImageOps.pad(im, (size, size), method=method, color=0)
    else:
        im = ImageOps.fit(im, (size, size), method=method)
    return np.asarray(im)


def _fit_volume(array: np.ndarray, size: int, policy: str) -> np.ndarray:
    """Volumes: area averaging when every axis shrinks (antialiased), else trilinear; pad and
    shortest as for pictures, on all three axes."""
    shape = np.array(array.shape, dtype=float)
    if tuple(array.shape) == (size,) * 3:
        return array
    if policy == "squash":
        target = [size] * 3
    else:
        scale = size / (shape.max() if policy == "pad" else shape.min())
        target = [max(1, round(s * scale)) for s in shape]
    tensor = torch.from_numpy(np.asarray(array, dtype=np.float32))[None, None]
    mode = "area" if all(t <= s for t, s in zip(target, shape, strict=True)) else "trilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    out = F.interpolate(tensor, size=target, mode=mode, **kwargs)[0, 0]
    out = _pad_or_crop(out, size)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def _pad_or_crop(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Centre each axis on `size`: zero borders where shorter, a centre crop where longer."""
    for axis, n in enumerate(volume.shape):
        if n > size:
            start = (n - size) // 2
            volume = volume.narrow(axis, start, size)
        elif n < size:
            before = (size - n) // 2
            pad = [0, 0] * 3
            pad[2 * (2 - axis)] = before  # F.pad lists the last axis first
            pad[2 * (2 - axis) + 1] = size - n - before
            volume = F.pad(volume, pad)
    return volume
