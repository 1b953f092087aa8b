"""Offline stand-ins for MedMNIST files: tests and demos run without the network.

`write_synthetic_medmnist` writes a file that the real medmnist classes load (same name, keys,
split sizes, channels, dtype). Images are class-structured: a smooth class prototype plus a
smooth per-image nuisance pattern plus pixel noise, so k-NN retrieval on them is clearly better
than chance but far from perfect. They are NOT medical images: numbers measured on them say the
pipeline runs, nothing about a model. Every synthetic file carries a `cbmir_synthetic` member so
that cbmir can refuse to treat it as the real dataset, and synthetic files are never written into
a folder meant for the real ones (`refuse_real_folder`).

`write_digits_npz` writes scikit-learn's bundled real handwritten digits in the same layout: real
data that is available offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from cbmir.data import catalog
from cbmir.data.files import SYNTHETIC_KEY, npz_path, read_synthetic_marker
from cbmir.data.locks import exclusive, remove_temporaries
from cbmir.errors import CbmirError, DataError

GENERATOR_VERSION = 1
_N_FREQ = 4  # cosines per smooth pattern
_MAX_FREQ = 3  # cycles across the image: low frequencies, so patterns look alike at every size
_N_NUISANCE = 16  # shared nuisance patterns mixed into every image
# Strengths relative to the class signal, tuned so that 1-NN on raw pixels scores roughly 0.9 on
# binary sets and 0.5 on 8-11 class sets (chance: 0.5 and ~0.1): informative, not trivial.
_NUISANCE = 3.0
_NOISE = 1.0
_GRAY_STD = 40.0  # grey levels per unit of total standard deviation, around mid-grey 128
_CHUNK_BYTES = 32 * 2**20


def _spatial_and_channels(flag: str, size: int) -> tuple[tuple[int, ...], int]:
    if catalog.is_3d(flag):
        return (size, size, size), 1
    return (size, size), catalog.n_channels(flag)


def _smooth_patterns(
    rng: np.random.Generator, n: int, spatial: tuple[int, ...], channels: int
) -> np.ndarray:
    """n unit-variance patterns [n, *spatial(, channels)], each a sum of low-frequency cosines.

    Frequencies and phases are drawn before the grid is built, so the same rng state gives the
    same pattern at every image size.
    """
    freqs = rng.integers(-_MAX_FREQ, _MAX_FREQ + 1, size=(n, channels, _N_FREQ, len(spatial)))
    phases = rng.uniform(0, 2 * np.pi, size=(n, channels, _N_FREQ))
    amps = rng.normal(size=(n, channels, _N_FREQ))
    grid = np.stack(
        np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in spatial], indexing="ij"),
        axis=-1,
    )  # [*spatial, ndim]
    out = np.zeros((n, channels, *spatial), dtype=np.float32)
    ones = (1,) * len(spatial)
    for k in range(_N_FREQ):
        arg = np.einsum("...d,ncd->nc...", grid, freqs[:, :, k].astype(np.float32))
        arg = 2 * np.pi * arg + phases[:, :, k].reshape(n, channels, *ones).astype(np.float32)
        out += amps[:, :, k].reshape(n, channels, *ones).astype(np.float32) * np.cos(arg)
    out -= out.mean(axis=tuple(range(1, out.ndim)), keepdims=True)
    out /= out.std(axis=tuple(range(1, out.ndim)), keepdims=True) + 1e-6
    if channels == 1:
        return out[:, 0]
    return np.moveaxis(out, 1, -1)  # channels last, as medmnist stores RGB


def _rng(seed: int, flag: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(flag.encode()), *more])


def synthetic_labels(flag: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Labels shaped like medmnist's: N x 1 class ids, or N x L binary for multi-label sets."""
    n_classes = len(catalog.label_names(flag))
    if catalog.is_multilabel(flag):
        return (rng.random((n, n_classes)) < 0.12).astype(np.uint8)
    return rng.integers(0, n_classes, size=(n, 1)).astype(np.uint8)


def synthetic_images(
    flag: str, size: int, labels: np.ndarray, seed: int = 0, split_id: int = 0
) -> Iterator[np.ndarray]:
    """Yield uint8 image blocks for `labels`, block by block to bound memory."""
    spatial, channels = _spatial_and_channels(flag, size)
    n_classes = len(catalog.label_names(flag))
    # class prototypes and nuisance bank depend on (seed, flag) only: same look at every size
    protos = _smooth_patterns(_rng(seed, flag, 0), n_classes, spatial, channels)
    bank = _smooth_patterns(_rng(seed, flag, 1), _N_NUISANCE, spatial, channels)
    protos, bank = protos.reshape(n_classes, -1), bank.reshape(_N_NUISANCE, -1)
    item_shape = (*spatial, channels) if channels > 1 else spatial
    rng = _rng(seed, flag, 2, size, split_id)
    rows = max(1, _CHUNK_BYTES // (protos.shape[1] * 4))
    for start in range(0, len(labels), rows):
        lab = labels[start : start + rows]
        if catalog.is_multilabel(flag):
            signal = lab.astype(np.float32) @ protos / np.sqrt(np.maximum(lab.sum(1), 1))[:, None]
        else:
            signal = protos[lab[:, 0]]
        coef = rng.normal(size=(len(lab), _N_NUISANCE)).astype(np.float32) / np.sqrt(_N_NUISANCE)
        x = signal + _NUISANCE * (coef @ bank)
        x += _NOISE * rng.standard_normal(x.shape, dtype=np.float32)
        x *= _GRAY_STD / np.sqrt(1 + _NUISANCE**2 + _NOISE**2)
        yield np.clip(np.rint(128 + x), 0, 255).astype(np.uint8).reshape(len(lab), *item_shape)


# --------------------------------------------------------------------------- npz writing


Blocks = Callable[[], Iterable[np.ndarray]]


def _write_npz_atomic(path: Path, members: dict[str, tuple[tuple[int, ...], np.dtype, Blocks]]):
    """Write an uncompressed npz (as `np.savez` does) member by member, then rename into place.

    Each member is (shape, dtype, blocks) where blocks() yields its rows in order, so files
    larger than RAM can be written. Call it holding `exclusive(path)`: its temporary is then
    recognisable as live (see `cbmir.data.locks`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # not mkstemp: mode 0600
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, (shape, dtype, blocks) in members.items():
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False,
                    "shape": tuple(shape),
                }
                written = 0
                with zf.open(f"{key}.npy", "w", force_zip64=True) as fp:
                    np.lib.format.write_array_header_1_0(fp, header)
                    for block in blocks():
                        fp.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
                        written += len(block) if block.ndim else 1
                if shape and written != shape[0]:
                    raise RuntimeError(f"{key}: wrote {written} rows, expected {shape[0]}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _const(arr: np.ndarray) -> tuple[tuple[int, ...], np.dtype, Blocks]:
    return arr.shape, arr.dtype, lambda: [arr]


def _real_roots(extra: Iterable[str | os.PathLike | None]) -> list[Path]:
    """Folders meant for real MedMNIST files: the given ones, $MEDMNIST_ROOT, ~/.medmnist."""
    roots = [*extra, os.environ.get("MEDMNIST_ROOT"), "~/.medmnist"]
    return [Path(r).expanduser() for r in roots if r]


def refuse_real_folder(folder: str | os.PathLike, real_roots: Iterable = ()) -> None:
    """Raise DataError unless synthetic files may go into `folder`: it must not be a folder for
    real MedMNIST files (`real_roots`, $MEDMNIST_ROOT, ~/.medmnist) nor hold a file under a
    MedMNIST name that is not synthetic. A synthetic file there would pass for the real one."""
    folder = Path(folder).expanduser()
    hint = (
        "Write synthetic data into a folder of its own: paths.synthetic_root "
        "(CBMIR_SYNTHETIC_ROOT, default ~/.cache/cbmir/synthetic) or cbmir-synth --root."
    )
    for root in _real_roots(real_roots):
        if os.path.realpath(root) == os.path.realpath(folder):
            raise DataError(
                f"Refusing to write synthetic MedMNIST files into {folder}: it is the folder "
                f"for the real MedMNIST files ({root}). {hint}"
            )
    if not folder.is_dir():
        return
    real_names = {
        npz_path(folder, f, s).name
        for f in catalog.FLAGS_2D + catalog.FLAGS_3D
        for s in catalog.valid_sizes(f)
    }
    for path in sorted(p for p in folder.iterdir() if p.name in real_names):
        try:
            synthetic = read_synthetic_marker(path) is not None
        except DataError:
            synthetic = False
        if not synthetic:
            raise DataError(
                f"Refusing to write synthetic MedMNIST files into {folder}: it holds "
                f"{path.name}, which is not a synthetic file (real data under a real name). {hint}"
            )


def write_synthetic_medmnist(
    root: str | os.PathLike,
    flag: str,
    size: int = 28,
    seed: int = 0,
    replace: bool = True,
    real_roots: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write `{root}/{flag}[_{size}].npz` in medmnist's layout with synthetic class-structured
    images and INFO's split sizes. Returns the path.

    `replace=False` keeps a file that is already there (one written meanwhile by a concurrent
    run). Refuses (DataError) folders meant for real files, see `refuse_real_folder`.
    """
    flag = catalog.check_flag_size(flag, size)
    path = npz_path(root, flag, size)
    refuse_real_folder(path.parent, real_roots)  # before anything, even a lock file, is written
    with exclusive(path) as locked:
        if locked:
            remove_temporaries(path)  # a killed writer's half-written npz
        if path.is_file() and not replace:
            return path
        return _write_npz_atomic(path, _synthetic_members(flag, size, seed))


def _synthetic_members(
    flag: str, size: int, seed: int
) -> dict[str, tuple[tuple[int, ...], np.dtype, Blocks]]:
    """The npz members of a synthetic file, images generated lazily, plus its marker."""
    spatial, channels = _spatial_and_channels(flag, size)
    item_shape = (*spatial, channels) if channels > 1 else spatial
    members: dict[str, tuple[tuple[int, ...], np.dtype, Blocks]] = {}
    for split_id, (split, n) in enumerate(catalog.n_samples(flag).items()):
        labels = synthetic_labels(flag, n, _rng(seed, flag, 3, split_id))
        members[f"{split}_images"] = (
            (n, *item_shape),
            np.dtype(np.uint8),
            lambda labels=labels, split_id=split_id: synthetic_images(
                flag, size, labels, seed, split_id
            ),
        )
        members[f"{split}_labels"] = _const(labels)
    marker = {
        "generator": "cbmir.data.synthetic",
        "version": GENERATOR_VERSION,
        "flag": flag,
        "size": size,
        "seed": seed,
    }
    members[SYNTHETIC_KEY] = _const(np.array(json.dumps(marker)))
    return members


def write_digits_npz(path: str | os.PathLike, size: int = 28, seed: int = 0) -> Path:
    """scikit-learn's bundled handwritten digits (1797 real 8x8 images, 10 classes), bilinearly
    upsampled to size x size uint8, split 60/20/20 train/val/test stratified by class."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(size, int) or size < 8:
        raise CbmirError(f"Digits size must be an integer >= 8 (the source is 8x8), not {size!r}.")
    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")
    images = np.clip(np.rint(big[:, 0].numpy() * 255), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.uint8)[:, None]
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, stratify=labels[:, 0], random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=labels[rest, 0], random_state=seed)
    members = {}
    for split, ids in (("train", train), ("val", val), ("test", test)):
        ids = np.sort(ids)
        members[f"{split}_images"] = _const(images[ids])
        members[f"{split}_labels"] = _const(labels[ids])
    path = Path(path).expanduser()
    with exclusive(path) as locked:
        if locked:
            remove_temporaries(path)
        return _write_npz_atomic(path, members)


# --------------------------------------------------------------------------- CLI


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    """`cbmir-synth`: write synthetic MedMNIST files and/or the real digits npz."""
    parser = argparse.ArgumentParser(
        prog="cbmir-synth",
        description="Write synthetic MedMNIST-format files (offline tests and demos; not real "
        "data) and/or scikit-learn's real digits in the same npz layout.",
    )
    parser.add_argument("--flags", type=_csv, default=[], help="e.g. breastmnist,organmnist3d")
    parser.add_argument("--sizes", type=_csv, default=["28"], help="e.g. 28,64 (default 28)")
    parser.add_argument(
        "--root",
        default=os.environ.get("CBMIR_SYNTHETIC_ROOT", "~/.cache/cbmir/synthetic"),
        help="folder for the npz files (default $CBMIR_SYNTHETIC_ROOT or "
        "~/.cache/cbmir/synthetic; never the folder of the real MedMNIST files)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", metavar="PATH", help="also write the digits npz to PATH")
    parser.add_argument("--digits-size", type=int, default=28)
    args = parser.parse_args(argv)
    if not args.flags and not args.digits:
        parser.error("nothing to do: give --flags and/or --digits")
    try:
        sizes = [int(s) for s in args.sizes]
    except ValueError:
        parser.error(f"--sizes must be integers, got {','.join(args.sizes)}")
    try:
        jobs = [(catalog.check_flag_size(f, s), s) for f in args.flags for s in sizes]
        for flag, size in jobs:
            path = write_synthetic_medmnist(args.root, flag, size, seed=args.seed)
            counts = ", ".join(f"{k} {v}" for k, v in catalog.n_samples(flag).items())
            print(f"wrote {path} (synthetic {flag} {size}px: {counts})")
        if args.digits:
            path = write_digits_npz(args.digits, size=args.digits_size, seed=args.seed)
            print(f"wrote {path} (sklearn digits {args.digits_size}px, 10 classes)")
    except CbmirError as exc:
        print(f"cbmir-synth: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
