"""Decode a collection once into the memory-mapped `.npy` layout the MedMNIST path uses
(`{split}_images.npy`, `{split}_labels.npy`, `manifest.json`), and reuse it while its key holds.

The key is the manifest (every file's path, labels, split), each file's version stamp
(the fields of `cbmir.io_utils.file_version`: size, mtime, ctime, inode, device), the decode settings and
format version, and the decoding libraries' versions. Stamps, not content hashes: reading every
file to hash it costs about what decoding it costs, which would defeat the cache; and a stamp
cannot be faked by `cp -p`/`rsync -a` (they keep size and mtime, but the ctime and inode are
new). So a changed, added or removed file changes the key and the collection is decoded again.
The store key of the embeddings is different: the sha256 of the decoded arrays and labels
(`manifest["source"]["sha256"]`), so a re-decode that yields the same pixels re-embeds nothing.

Decoding writes into a temporary folder (rows straight into `np.lib.format.open_memmap`, so RAM
stays bounded), under the collection's lock, and is installed by one rename; the manifest is
written last. A folder without a manifest whose key matches is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from cbmir.data.collection import Collection, Row, check_collection, listing
from cbmir.data.decode import (
    VOLUME_KINDS,
    DecodeError,
    DecodeSettings,
    Header,
    fit,
    kind_of,
    read_header,
    read_item,
)
from cbmir.data.files import FORMAT_VERSION as NPY_FORMAT
from cbmir.data.files import MANIFEST, read_manifest
from cbmir.data.locks import exclusive, remove_temporaries
from cbmir.errors import ConfigError, DataError
from cbmir.io_utils import write_json, write_text

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
SKIPPED = "skipped_files.txt"
ON_ERROR = ("stop", "skip")
_COPY_BYTES = 256 * 2**20


def _stamp(st: os.stat_result) -> list[int]:
    """`cbmir.io_utils.file_version` without the real path (the row's path is in the key
    already, and resolving every path costs a stat per path component)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _versions(path: Path) -> list[list[int]]:
    """The stamps that a row's content depends on (a DICOM folder: itself and every slice)."""
    try:
        st = os.stat(path)
        stamps = [_stamp(st)]
        if stat.S_ISDIR(st.st_mode):
            stamps += [_stamp(os.stat(p)) for p in sorted(path.iterdir()) if p.is_file()]
    except FileNotFoundError:
        raise DataError(f"{path} disappeared while the collection was read; run again.") from None
    return stamps


def _library_versions() -> dict[str, str | None]:
    """The decoders' versions (None: not installed; then no file of theirs decodes)."""
    found: dict[str, str | None] = {}
    for name in ("pillow", "pydicom", "nibabel", "numpy", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def collection_key(collection: Collection, settings: DecodeSettings, on_error: str) -> str:
    """sha256 of everything that decides the decoded arrays (the module's docstring)."""
    record = {
        "cache_format": CACHE_FORMAT,
        "decode": settings.identity(),
        "on_error": on_error,
        "libraries": _library_versions(),
        "label_names": collection.label_names,
        "multilabel": collection.multilabel,
        "rows": [
            [str(r.path), list(r.labels), r.split, _versions(r.path)] for r in collection.rows
        ],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def cache_dir_for(
    collection: Collection, cache_root: Path, name: str, settings: DecodeSettings, on_error: str
) -> Path:
    """One folder per source and decode settings: runs with other settings never replace it
    under each other; a changed file replaces it (a run still reading the old one notices, see
    `RetrievalDataModule.dataset`)."""
    ident = json.dumps(
        [os.path.realpath(collection.source), settings.identity(), on_error], sort_keys=True
    )
    return cache_root / f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def trusted(target: Path, key: str) -> dict[str, Any] | None:
    """The manifest of `target` if it is a finished decoding with this key."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        ok = manifest["source"]["key"] == key and all(
            (target / f"{s}_{kind}.npy").is_file()
            for s in manifest["splits"]
            for kind in ("images", "labels")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if ok else None


# --------------------------------------------------------------------------- decoding


class _Items(Dataset):
    """Rows decoded in DataLoader workers: (index, uint8 array or None, error or None, volume).

    Arrays come resized but never colour-expanded: whether the collection is colour is known
    only once every item is decoded, and the writer broadcasts a grey item into RGB for free.
    """

    def __init__(self, rows: list[Row], settings: DecodeSettings):
        self.rows, self.settings = rows, settings

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None, bool]:
        path = self.rows[index].path
        kind = kind_of(path)
        volume = kind in VOLUME_KINDS
        try:
            array = read_item(path, self.settings.window, kind)
            return index, fit(array, self.settings, False, volume), None, volume
        except DecodeError as exc:
            return index, None, str(exc), volume


def _as_list(batch: list) -> list:
    return batch


@dataclass
class _Plan:
    """The stored item shape, learned from the first decoded item (or `data.size`)."""

    shape: tuple[int, ...]  # (H, W) or (D, H, W), without the colour axis
    color: bool
    volume: bool

    @property
    def stored(self) -> tuple[int, ...]:
        return self.shape + ((3,) if self.color else ())

    @classmethod
    def first(cls, array: np.ndarray, volume: bool) -> _Plan:
        return cls(_spatial(array, volume), not volume and array.ndim == 3, volume)

    def admits(self, array: np.ndarray, volume: bool) -> bool:
        """Same kind (2D/3D) and size; colour may differ (grey is broadcast, see `_Writer`)."""
        return volume == self.volume and _spatial(array, volume) == self.shape


def _spatial(array: np.ndarray, volume: bool) -> tuple[int, ...]:
    """An item's size without its colour axis."""
    return tuple(array.shape[:3] if volume else array.shape[:2])


class _Failures:
    """Unreadable files: raised together (on_error=stop) or skipped and listed (skip)."""

    def __init__(self, on_error: str, source: Path) -> None:
        self.on_error, self.source, self.errors = on_error, source, {}

    def add(self, path: Path, message: str) -> None:
        self.errors[path] = message

    def settle(self) -> None:
        if not self.errors or self.on_error == "skip":
            return
        first = next(iter(self.errors.values()))
        raise DataError(
            f"{self.source}: {listing(list(self.errors), 'unreadable files')}. First: {first}. "
            f"Fix or remove them, or set data.on_error=skip to leave them out (listed in "
            f"{SKIPPED})."
        )


def _explain_mismatch(collection: Collection, path: Path, plan: _Plan, found: tuple) -> None:
    """An item that does not fit the stored shape: the collection mixes 2D and 3D or (without
    data.size) sizes. Only now are the headers read (cheaply), to name every size found with
    an example, as the message always has; the partial decode is thrown away by the caller."""
    failures = _Failures("skip", collection.source)  # unreadable files are not the point here
    headers: dict[Path, Header] = {}
    for row in collection.rows:
        try:
            headers[row.path] = read_header(row.path)
        except DecodeError as exc:
            failures.add(row.path, str(exc))
    kinds = {h.volume for h in headers.values()}
    if len(kinds) > 1:
        volumes = [p for p, h in headers.items() if h.volume]
        raise DataError(
            f"{collection.source} mixes 2D images and volumes "
            f"({listing(volumes, 'volumes')}); one kind per collection."
        )
    _common_shape(headers, collection.source)
    raise DataError(  # headers agree, pixels do not: name the file itself
        f"{collection.source}: {path} decodes to {' x '.join(map(str, found))}, the others to "
        f"{' x '.join(map(str, plan.shape))}; set data.size=N to resize them all to N x N."
    )


def _common_shape(headers: dict[Path, Header], source: Path) -> tuple[int, ...]:
    shapes: dict[tuple[int, ...], list[Path]] = {}
    for path, header in headers.items():
        shapes.setdefault(header.shape, []).append(path)
    if len(shapes) <= 1:
        return next(iter(shapes), ())
    examples = ", ".join(f"{paths[0]}: {' x '.join(map(str, s))}" for s, paths in shapes.items())
    raise DataError(
        f"{source}: the images have {len(shapes)} different sizes (e.g. {examples[:400]}); set "
        f"data.size=N to resize them all to N x N (data.resize=squash|pad|shortest)."
    )


class _Writer:
    """Decoded items into each split's memmap, in order, with the shape learned while decoding:
    from the first readable item (or `data.size`). A colour item arriving in a so far grey
    collection turns every array written so far into RGB (grey repeated, as `fit` does)."""

    def __init__(self, collection: Collection, out: Path) -> None:
        self.collection, self.out = collection, out
        self.plan: _Plan | None = None
        self.written: list[Path] = []  # finished splits' image files

    def decode_split(
        self,
        rows: list[Row],
        settings: DecodeSettings,
        workers: int,
        failures: _Failures,
        split: str,
    ) -> list[Row]:
        """Decode `rows` into `{split}_images.npy`, compacting past failures; the rows kept."""
        from tqdm.auto import tqdm

        target = self.out / f"{split}_images.npy"
        loader = DataLoader(
            _Items(rows, settings), batch_size=16, num_workers=workers, collate_fn=_as_list
        )
        images: np.ndarray | None = None
        kept: list[Row] = []
        with tqdm(total=len(rows), desc=f"decoding {split}", unit="file", mininterval=2) as bar:
            for batch in loader:
                for index, array, error, volume in batch:
                    path = rows[index].path
                    if error is not None:
                        failures.add(path, error)
                        continue
                    images = self._place(images, target, len(rows), array, volume, path)
                    images[len(kept)] = array if array.ndim == images.ndim - 1 else array[..., None]
                    kept.append(rows[index])
                bar.update(len(batch))
        del images  # no msync: the kernel writes the pages back (and throttles dirty ones) itself
        failures.settle()
        if kept:
            assert self.plan is not None
            if len(kept) < len(rows):
                _rewrite(target, len(kept), lambda chunk: chunk)
            self.written.append(target)
        return kept

    def _place(
        self,
        images: np.ndarray | None,
        target: Path,
        n: int,
        array: np.ndarray,
        volume: bool,
        path: Path,
    ) -> np.ndarray:
        """The memmap to write `array` into: opened at the first item, widened to RGB at the
        first colour item of a grey collection; a misfit stops (`_explain_mismatch`)."""
        if self.plan is None:
            self.plan = _Plan.first(array, volume)
        if not self.plan.admits(array, volume):
            _explain_mismatch(self.collection, path, self.plan, _spatial(array, volume))
        if not volume and array.ndim == 3 and not self.plan.color:
            self.plan.color = True
            if images is not None:  # the caller's old map then refers to the replaced file
                _rewrite(target, n, _as_rgb)
                images = np.lib.format.open_memmap(target, mode="r+")
            for done in self.written:
                _rewrite(done, None, _as_rgb)
        if images is None:
            images = np.lib.format.open_memmap(
                target, mode="w+", dtype=np.uint8, shape=(n, *self.plan.stored)
            )
        return images


def _as_rgb(rows: np.ndarray) -> np.ndarray:
    return np.repeat(rows[..., None], 3, axis=-1)


def _rewrite(path: Path, n: int | None, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace an .npy file by `change` of its first `n` rows (None: all), in chunks so that
    RAM stays bounded (skipped files compacted away, grey made RGB); swapped in by one rename."""
    old = np.load(path, mmap_mode="r")
    n = len(old) if n is None else n
    shape = change(old[:1]).shape[1:]
    tmp = path.with_name(path.name + ".part")
    new = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))
    step = max(1, _COPY_BYTES // max(1, int(np.prod(shape))))
    for start in range(0, n, step):
        stop = min(n, start + step)
        new[start:stop] = change(old[start:stop])
    del new, old
    os.replace(tmp, path)


def _content_sha256(out: Path, splits: list[str]) -> str:
    """sha256 over every split's stored arrays (shape, labels and pixels)."""
    digest = hashlib.sha256()
    for split in splits:
        for kind in ("images", "labels"):
            digest.update(f"{split}_{kind}".encode())
            with open(out / f"{split}_{kind}.npy", "rb") as fh:
                while chunk := fh.read(16 * 2**20):
                    digest.update(chunk)
    return digest.hexdigest()


def decode_into(
    collection: Collection,
    settings: DecodeSettings,
    out: Path,
    key: str,
    *,
    workers: int = 0,
    on_error: str = "stop",
    query_split: str = "test",
    database_split: str = "train",
) -> dict[str, Any]:
    """Decode every split into the (empty) folder `out`; write the manifest last."""
    failures = _Failures(on_error, collection.source)
    writer = _Writer(collection, out)
    kept: list[Row] = []
    for split in collection.splits:
        kept += writer.decode_split(
            collection.split_rows(split), settings, workers, failures, split
        )
    plan = writer.plan
    if plan is None or not kept:
        raise DataError(f"{collection.source}: no readable file at all.")
    final = replace(collection, rows=kept)
    check_collection(final, query_split, database_split)  # again: skips may empty a split
    if collection_key(collection, settings, on_error) != key:
        raise DataError(f"{collection.source}: files changed while they were decoded; run again.")
    for split in final.splits:
        labels = np.asarray([r.labels for r in final.split_rows(split)], dtype=np.int64)
        np.save(out / f"{split}_labels.npy", labels)
        write_text(
            out / f"{split}_files.txt", "".join(f"{r.path}\n" for r in final.split_rows(split))
        )
    skipped = sorted(failures.errors.items())
    write_text(out / SKIPPED, "".join(f"{p}\t{m}\n" for p, m in skipped))
    if skipped:
        log.warning(
            "data.on_error=skip: %s (listed in %s)",
            listing([p for p, _ in skipped], "unreadable files skipped"),
            SKIPPED,
        )
    side = list(plan.shape[:2]) if not plan.volume else list(plan.shape)
    manifest = {
        "format": NPY_FORMAT,
        "source": {
            "name": collection.source.name,
            "kind": collection.kind,
            "key": key,
            "sha256": _content_sha256(out, final.splits),
        },
        "layout": "volume" if plan.volume else ("rgb2d" if plan.color else "gray2d"),
        "image_shape": side if plan.volume else [3 if plan.color else 1, *side],
        "label_columns": len(kept[0].labels),
        "label_names": collection.label_names,
        "splits": {s: {"n": len(final.split_rows(s))} for s in final.splits},
        "decode": settings.identity(),
        "skipped": len(skipped),
        "synthetic": None,
    }
    write_json(out / MANIFEST, manifest)  # last: marks the folder complete
    return manifest


def prepare_collection(
    collection: Collection,
    settings: DecodeSettings,
    cache_root: Path,
    name: str,
    *,
    workers: int = 0,
    on_error: str = "stop",
    query_split: str = "test",
    database_split: str = "train",
) -> tuple[Path, str]:
    """(the decoded folder of `collection`, its key): reused while the key holds, else decoded
    (once, by one process) and installed atomically."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error must be stop or skip, not {on_error!r}.")
    check_collection(collection, query_split, database_split)
    key = collection_key(collection, settings, on_error)
    target = cache_dir_for(collection, cache_root, name, settings, on_error)
    if trusted(target, key) is not None:
        return target, key
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"Cannot create the collection cache {cache_root} ({exc}); set "
            f"data.cache_dir to a writable folder."
        ) from None
    with exclusive(target) as locked:
        if locked:
            remove_temporaries(target)  # only dead writers' (a live one would hold the lock)
        if trusted(target, key) is not None:  # another process decoded it meanwhile
            return target, key
        log.info("decoding %s (%d files) into %s", collection.source, len(collection.rows), target)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            decode_into(
                collection,
                settings,
                tmp,
                key,
                workers=workers,
                on_error=on_error,
                query_split=query_split,
                database_split=database_split,
            )
            _install(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    read_manifest(target)
    return target, key


def _install(tmp: Path, target: Path) -> None:
    """Replace `target` by `tmp` (under the lock): the old folder is moved aside, then removed."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, target)
