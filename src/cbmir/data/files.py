"""MedMNIST-layout `.npz` files: where they live, downloading them, and converting them once
to per-split `.npy` files that can really be memory-mapped.

`np.load(..., mmap_mode="r")` does nothing on an `.npz` (a zip), so every process would load a
whole split into RAM (PathMNIST at 224 px is ~16 GB). The conversion streams each zip member
into an `.npy` file, validating shapes, dtypes and counts on the way, and installs the result
atomically: a directory that holds a `manifest.json` is complete and matches its source.

Everything is keyed by content: the conversion is reused only while the source's sha256 (cached
per file version, see `cbmir.data.digests`) equals the one in its manifest, so a file replaced
with its size and mtime preserved (`cp -p`, `rsync -a`) is converted again. One process at a time
writes or converts a given file (`cbmir.data.locks`); the others wait and then reuse its work,
and the leftovers of killed runs are removed by the next one.

Image dtype rule: images are stored as uint8. Integer images must already lie in [0, 255]; float
images in [0, 1] are scaled by 255, float images in [0, 255] are kept; both are rounded.
Anything else is a DataError (rescale it yourself: the right mapping depends on the modality).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from cbmir.data.catalog import SPLITS, check_flag_size, size_suffix, url_and_md5
from cbmir.data.digests import Digests, file_digests
from cbmir.data.locks import exclusive, remove_temporaries
from cbmir.errors import DOWNLOAD_ERRORS, DataError
from cbmir.io_utils import file_version

FORMAT_VERSION = 2  # 2: trusted by the source's sha256 (1: by size + mtime)
MANIFEST = "manifest.json"
SYNTHETIC_KEY = "cbmir_synthetic"  # extra npz member marking files written by cbmir-synth
REQUIRED_SPLITS = ("train", "test")
LAYOUTS = ("gray2d", "rgb2d", "volume")
_CHUNK_BYTES = 64 * 2**20
_FIX_HINT = (
    "Expected keys train_images/train_labels, test_images/test_labels (val_* optional); images "
    "N x H x W, N x H x W x 3 or volumes N x D x H x W; labels N x 1 or N x L integers."
)


def npz_path(root: str | os.PathLike, flag: str, size: int) -> Path:
    """medmnist's file layout: `{root}/{flag}.npz` for 28 px, `{root}/{flag}_{size}.npz` else."""
    return Path(root).expanduser() / f"{flag}{size_suffix(size)}.npz"


def npy_dir_for(npz_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted arrays of `npz_file` go: `{cache_dir or its folder}/{stem}_npy/`."""
    npz_file = Path(npz_file).expanduser()
    base = Path(cache_dir).expanduser() if cache_dir is not None else npz_file.parent
    return base / f"{npz_file.stem}_npy"


# --------------------------------------------------------------------------- download


def download_npz(flag: str, size: int, root: str | os.PathLike) -> Path:
    """Download one MedMNIST file from Zenodo with MD5 check, as medmnist itself does.

    One process downloads a given file at a time; one that waited finds the file in place and
    returns it. The transfer goes to a `.part` file of its own, so an interrupted transfer never
    looks like a dataset and two transfers never write into one file.
    """
    flag = check_flag_size(flag, size)
    target = npz_path(root, flag, size)
    url, md5 = url_and_md5(flag, size)
    with exclusive(target) as locked:
        if locked:
            remove_temporaries(target)  # a killed download's .part
        if target.is_file():
            return target
        os.replace(download_part(url, md5, target), target)
    return target


def download_part(url: str, md5: str, target: Path) -> Path:
    """Download `url` into a fresh `.{target name}.{random}.part` beside `target`, check its MD5
    and return that path (the caller moves it into place)."""
    part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        from torchvision.datasets.utils import download_url

        download_url(url=url, root=str(target.parent), filename=part.name, md5=md5)
        if not part.is_file():
            raise FileNotFoundError(part)
    except BaseException as exc:
        part.unlink(missing_ok=True)  # no half-downloaded file, whatever stopped the transfer
        if not isinstance(exc, DOWNLOAD_ERRORS):
            raise  # a bug (or Ctrl-C): its traceback
        # a failed download: the network stack's traceback helps nobody here
        raise DataError(
            f"Could not download {target.name} ({type(exc).__name__}: {exc}). Expected the file "
            f"at {target}. Download it manually from {url} (MD5 {md5}) and place it there, or "
            f"set data.root to a folder that already holds it."
        ) from None
    return part


# --------------------------------------------------------------------------- zip reading


def _member_name(zf: zipfile.ZipFile, key: str) -> str | None:
    names = set(zf.namelist())
    return next((name for name in (f"{key}.npy", key) if name in names), None)


def _npz_keys(zf: zipfile.ZipFile) -> list[str]:
    return sorted(n[:-4] if n.endswith(".npy") else n for n in zf.namelist())


def _read_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the `.npy` stream `fp`, left at the start of its data.

    numpy has public header readers for 1.0 and 2.0 only. A 3.0 header has 2.0's byte layout
    with UTF-8 instead of latin-1 text, which is the same bytes for every dtype cbmir accepts
    (numeric descrs are ASCII; only structured field names can differ, and those are refused).
    Any other version is a ValueError, which the callers report as an unreadable file.
    """
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f".npy format version {version[0]}.{version[1]} (cbmir reads 1.0 to 3.0)")


def _header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    with zf.open(member) as fp:
        return _read_header(fp)


def _read_full(zf: zipfile.ZipFile, member: str) -> np.ndarray:
    with zf.open(member) as fp:
        return np.lib.format.read_array(fp, allow_pickle=False)


def _iter_rows(zf: zipfile.ZipFile, member: str, src: Path):
    """Yield row blocks of a C-ordered member without loading it whole."""
    shape, fortran, dtype = _header(zf, member)
    if fortran:  # rare; rows are not contiguous, so load it once
        yield np.ascontiguousarray(_read_full(zf, member))
        return
    with zf.open(member) as fp:
        _read_header(fp)
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = max(1, row_items * dtype.itemsize)
        rows = max(1, _CHUNK_BYTES // row_bytes)
        done = 0
        while done < shape[0]:
            n = min(rows, shape[0] - done)
            buf = fp.read(n * row_bytes)
            if len(buf) != n * row_bytes:
                raise DataError(f"{src} is truncated: member {member} ends early. Re-download it.")
            yield np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:])
            done += n


# --------------------------------------------------------------------------- validation


def _resolve_layout(item_shape: tuple[int, ...], volumes: bool | None, src: Path) -> str:
    """Decide gray2d / rgb2d / volume from one image's shape (without the N axis)."""
    shown = " x ".join(["N", *map(str, item_shape)])
    if len(item_shape) == 2:
        if volumes:
            raise DataError(f"{src}: volumes=True but images are {shown} (2D images).")
        return "gray2d"
    if len(item_shape) != 3:
        raise DataError(f"{src}: images are {shown}. {_FIX_HINT}")
    if volumes:
        return "volume"
    last, first = item_shape[-1], item_shape[0]
    if last in (1, 3):
        return "gray2d" if last == 1 else "rgb2d"
    if volumes is False:
        raise DataError(f"{src}: volumes=False but images are {shown}: not N x H x W x 3.")
    if first in (1, 3):
        raise DataError(
            f"{src}: images are {shown}, which looks like channels-first 2D images. Store them "
            f"channels-last (N x H x W x {first}) or, if these are {first}-slice volumes, set "
            f"volumes=True."
        )
    return "volume"


def _item_tensor_shape(item_shape: tuple[int, ...], layout: str) -> list[int]:
    if layout == "gray2d":
        return [1, item_shape[0], item_shape[1]]
    if layout == "rgb2d":
        return [3, item_shape[0], item_shape[1]]
    return list(item_shape)


def _scan_headers(zf, src: Path, volumes: bool | None, expected_n: dict[str, int] | None):
    """Validate every split's header (cheap) before any data is written."""
    keys = _npz_keys(zf)
    splits = [
        s for s in SPLITS if _member_name(zf, f"{s}_images") or _member_name(zf, f"{s}_labels")
    ]
    missing = [
        f"{s}_{kind}"
        for s in sorted(set(REQUIRED_SPLITS) | set(splits), key=SPLITS.index)
        for kind in ("images", "labels")
        if _member_name(zf, f"{s}_{kind}") is None
    ]
    if missing:
        raise DataError(
            f"{src} lacks {', '.join(missing)}; it holds {', '.join(keys) or 'no arrays'}. "
            f"{_FIX_HINT}"
        )
    info: dict[str, dict[str, Any]] = {}
    layout = item_shape = n_cols = None
    for split in splits:
        img_member = _member_name(zf, f"{split}_images")
        lab_member = _member_name(zf, f"{split}_labels")
        ishape, _, idtype = _header(zf, img_member)
        lshape, _, ldtype = _header(zf, lab_member)
        if idtype.hasobject or not (np.issubdtype(idtype, np.integer) or idtype.kind == "f"):
            raise DataError(f"{src}: {split}_images has dtype {idtype}; expected uint8 images.")
        if ldtype.hasobject or not (np.issubdtype(ldtype, np.integer) or ldtype.kind in "fb"):
            raise DataError(f"{src}: {split}_labels has dtype {ldtype}; expected integer labels.")
        if len(ishape) < 3:
            raise DataError(f"{src}: {split}_images has shape {ishape}. {_FIX_HINT}")
        if len(lshape) not in (1, 2) or (len(lshape) == 2 and lshape[1] < 1):
            raise DataError(f"{src}: {split}_labels has shape {lshape}. {_FIX_HINT}")
        if ishape[0] == 0:
            raise DataError(f"{src}: {split}_images is empty; every split needs images.")
        if ishape[0] != lshape[0]:
            raise DataError(
                f"{src}: {split} has {ishape[0]} images but {lshape[0]} labels; they must match."
            )
        if expected_n is not None and split in expected_n and ishape[0] != expected_n[split]:
            raise DataError(
                f"{src}: {split} has {ishape[0]} images, expected {expected_n[split]} (as medmnist "
                f"asserts). The file is incomplete or not the official one: delete it and "
                f"download it again."
            )
        this_layout = _resolve_layout(tuple(ishape[1:]), volumes, src)
        this_cols = 1 if len(lshape) == 1 else lshape[1]
        if layout is None:
            layout, item_shape, n_cols = this_layout, tuple(ishape[1:]), this_cols
        elif (this_layout, tuple(ishape[1:]), this_cols) != (layout, item_shape, n_cols):
            raise DataError(
                f"{src}: {split} images/labels ({ishape}, {lshape}) do not match the other "
                f"splits (image {item_shape}, {n_cols} label columns)."
            )
        info[split] = {
            "n": int(ishape[0]),
            "source_images_shape": list(ishape),
            "source_images_dtype": str(idtype),
            "source_labels_shape": list(lshape),
            "source_labels_dtype": str(ldtype),
        }
    if expected_n is not None:
        absent = [s for s in expected_n if s not in info]
        if absent:
            raise DataError(f"{src} lacks the {', '.join(absent)} split(s). {_FIX_HINT}")
    return layout, item_shape, n_cols, info


def _float_mode(zf, member: str, src: Path, name: str) -> float:
    """Scale factor for float images: 255 for [0,1] data, 1 for [0,255] data."""
    lo, hi = np.inf, -np.inf
    for block in _iter_rows(zf, member, src):
        if not np.isfinite(block).all():
            raise DataError(f"{src}: {name} contains NaN or Inf values.")
        lo, hi = min(lo, float(block.min(initial=np.inf))), max(hi, float(block.max(initial=-1)))
    if lo >= 0 and hi <= 1:
        return 255.0
    if lo >= 0 and hi <= 255:
        return 1.0
    raise DataError(
        f"{src}: {name} are floats in [{lo:g}, {hi:g}]; expected uint8, or floats in [0, 1] or "
        f"[0, 255]. Rescale them to uint8 first."
    )


def _write_images(zf, src: Path, out_dir: Path, split: str, n: int, item_shape, layout) -> str:
    name = f"{split}_images"
    member, out = _member_name(zf, name), out_dir / f"{name}.npy"
    dtype = _header(zf, member)[2]
    out_shape = (n, *item_shape[:2]) if layout == "gray2d" else (n, *item_shape)
    scale = _float_mode(zf, member, src, name) if dtype.kind == "f" else None
    header = {"descr": "|u1", "fortran_order": False, "shape": out_shape}
    done = 0
    with open(out, "wb") as fh:  # plain writes: a writable memmap would pile up dirty pages
        np.lib.format.write_array_header_1_0(fh, header)
        for block in _iter_rows(zf, member, src):
            if scale is not None:
                block = np.rint(block * scale)
            elif dtype != np.uint8 and (block.min(initial=0) < 0 or block.max(initial=0) > 255):
                raise DataError(
                    f"{src}: {name} has values outside [0, 255] (dtype {dtype}); rescale to uint8."
                )
            fh.write(np.ascontiguousarray(block, dtype=np.uint8).tobytes())
            done += len(block)
    if done != n:
        raise DataError(f"{src}: {name} has {done} rows, its header says {n}. Re-download it.")
    if scale == 255.0:
        return "float [0,1] scaled by 255"
    return "float [0,255] rounded" if scale else ("none" if dtype == np.uint8 else "cast")


def _write_labels(zf, src: Path, out_dir: Path, split: str) -> None:
    name = f"{split}_labels"
    labels = _read_full(zf, _member_name(zf, name))
    labels = labels.reshape(len(labels), -1) if labels.ndim == 1 else labels
    if labels.dtype.kind == "f" and (
        not np.isfinite(labels).all() or (labels != np.round(labels)).any()
    ):
        raise DataError(f"{src}: {name} are non-integer floats; expected integer class ids.")
    if labels.size and labels.min() < 0:
        raise DataError(f"{src}: {name} has negative values; expected class ids >= 0.")
    np.save(out_dir / f"{name}.npy", labels.astype(np.int64))


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class SourceFacts:
    """What is known about a source file before it is converted: its checksums (of the version
    about to be converted) and its synthetic marker (None for any other file)."""

    path: Path
    sha256: str
    md5: str
    synthetic: dict[str, Any] | None


SourceCheck = Callable[[SourceFacts], None]


def read_manifest(npy_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a converted directory; a directory without one is not trusted."""
    path = Path(npy_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{npy_dir} is not a finished conversion (no {MANIFEST}); run the conversion again "
            f"(it is redone automatically when the data module prepares its data)."
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); delete {npy_dir} to rebuild it.") from None


def _marker(zf: zipfile.ZipFile) -> dict[str, Any] | None:
    member = _member_name(zf, SYNTHETIC_KEY)
    return json.loads(_read_full(zf, member).item()) if member else None


def read_synthetic_marker(src: Path) -> dict[str, Any] | None:
    """The `cbmir_synthetic` member of an npz (written by cbmir-synth), or None. Cheap: reads
    the zip directory and one small member."""
    try:
        with zipfile.ZipFile(src) as zf:
            return _marker(zf)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        raise _unreadable(src, exc) from None


def _unreadable(src: Path, exc: BaseException) -> DataError:
    return DataError(
        f"{src} is not a readable MedMNIST .npz file ({type(exc).__name__}: {exc}). It may "
        f"be corrupt or partly downloaded: delete it and download it again."
    )


def _trusted(
    npy_dir: Path, sha256: str, volumes: bool | None, expected_n: dict[str, int] | None
) -> dict | None:
    """The manifest of `npy_dir` if it is a finished conversion of the content `sha256`."""
    try:
        manifest = json.loads((npy_dir / MANIFEST).read_text())
        ok = (
            manifest.get("format") == FORMAT_VERSION
            and manifest["source"]["sha256"] == sha256
            and (volumes is None or (manifest["layout"] == "volume") == volumes)
            and all(
                manifest["splits"].get(s, {}).get("n") == n for s, n in (expected_n or {}).items()
            )
            and all(
                (npy_dir / f"{s}_{kind}.npy").is_file()
                for s in manifest["splits"]
                for kind in ("images", "labels")
            )
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if ok else None


# --------------------------------------------------------------------------- conversion


def digest_cache_for(npz_file: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the checksums of `npz_file` are cached: beside its converted directory."""
    return npy_dir_for(npz_file, cache_dir).with_name(f".{npz_file.name}.digests.json")


def _writable_folder(folder: Path) -> bool:
    """A folder cbmir may write into (or create); a read-only one can only serve what is there."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def convert_npz_to_npy(
    npz_file: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    expected_n: dict[str, int] | None = None,
    volumes: bool | None = None,
    check_source: SourceCheck | None = None,
) -> Path:
    """Convert a MedMNIST-layout npz to memory-mappable per-split `.npy` files, once.

    Returns the directory with `{split}_images.npy`, `{split}_labels.npy` and `manifest.json`.
    Reuses it while the source's content (sha256) is unchanged. `volumes` forces (True) or
    forbids (False) reading 4D image arrays as N x D x H x W volumes; None decides by shape.
    `check_source` sees the source's checksums and synthetic marker before anything is written
    or reused, and raises to refuse the file (e.g. a MedMNIST file with the wrong MD5).
    """
    src = Path(npz_file).expanduser()
    if not src.is_file():
        raise DataError(f"Expected a MedMNIST-layout .npz file at {src}; there is none.")
    target = npy_dir_for(src, cache_dir)
    writable = _writable_folder(target.parent)
    with exclusive(target) if writable else nullcontext(False) as locked:
        if locked:
            remove_temporaries(target)  # only dead writers': a live one would hold the lock
        digests = file_digests(src, digest_cache_for(src, cache_dir))
        if check_source is not None:
            check_source(SourceFacts(src, digests.sha256, digests.md5, read_synthetic_marker(src)))
        if _trusted(target, digests.sha256, volumes, expected_n) is not None:
            return target
        if not writable:
            raise DataError(
                f"Cannot write the converted arrays next to {src} (read-only folder). Put them "
                f"in a writable folder: ++data.cache_dir=DIR (the cache_dir argument in Python)."
            )
        _convert_and_install(src, target, digests, volumes, expected_n)
    return target


def _convert_and_install(
    src: Path,
    target: Path,
    digests: Digests,
    volumes: bool | None,
    expected_n: dict[str, int] | None,
) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()  # not mkdtemp: its 0700 mode would hide shared data from other users
    except OSError as exc:
        raise DataError(
            f"Cannot write the converted arrays next to {src} ({exc}). Put them in a writable "
            f"folder: ++data.cache_dir=DIR (the cache_dir argument in Python)."
        ) from None
    try:
        _convert_into(src, tmp, volumes, expected_n, digests)
        _install(tmp, target, digests.sha256, volumes, expected_n)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_into(
    src: Path,
    out: Path,
    volumes: bool | None,
    expected_n: dict[str, int] | None,
    digests: Digests,
) -> None:
    try:
        with zipfile.ZipFile(src) as zf:
            layout, item_shape, n_cols, splits = _scan_headers(zf, src, volumes, expected_n)
            for split, meta in splits.items():
                meta["conversion"] = _write_images(
                    zf, src, out, split, meta["n"], item_shape, layout
                )
                _write_labels(zf, src, out, split)
            synthetic = _marker(zf)
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        raise _unreadable(src, exc) from None
    if file_version(src) != digests.stamp:  # the arrays must come from the version that was hashed
        raise DataError(f"{src} changed while it was being converted; run again.")
    manifest = {
        "format": FORMAT_VERSION,
        "source": {
            "name": src.name,
            "size": digests.stamp["size"],
            "mtime_ns": digests.stamp["mtime_ns"],
            "sha256": digests.sha256,
            "md5": digests.md5,
        },
        "layout": layout,
        "image_shape": _item_tensor_shape(item_shape, layout),
        "label_columns": n_cols,
        "splits": splits,
        "synthetic": synthetic,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written last: marks complete


def _install(
    tmp: Path, target: Path, sha256: str, volumes: bool | None, expected_n: dict[str, int] | None
) -> None:
    """Move a finished conversion into place; an old or partial target is moved aside first."""
    for _ in range(3):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if not target.exists():
                raise
        if _trusted(target, sha256, volumes, expected_n) is not None:  # another process won
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    raise DataError(f"Could not install the converted arrays at {target}; delete it and rerun.")


def load_split_arrays(npy_dir: str | os.PathLike, split: str) -> tuple[np.memmap, np.ndarray]:
    """(images memory-mapped read-only, labels [N, L] int64) of one converted split."""
    npy_dir = Path(npy_dir)
    manifest = read_manifest(npy_dir)
    if split not in manifest["splits"]:
        raise DataError(
            f"Split '{split}' is not in {manifest['source']['name']}; it has "
            f"{', '.join(manifest['splits'])}."
        )
    images = np.load(npy_dir / f"{split}_images.npy", mmap_mode="r")
    labels = np.load(npy_dir / f"{split}_labels.npy")
    return images, labels
