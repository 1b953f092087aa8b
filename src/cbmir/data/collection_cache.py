"""Decode a collection once into the memory-mapped `.npy` layout the MedMNIST path uses
(`{split}_images.npy`, `{split}_labels.npy`, `manifest.json`), and reuse it while its key holds.

The key is the manifest (every file's path, labels, split), each file's version stamp
(the fields of `cbmir.io_utils.file_version`: size, mtime, ctime, inode, device), the decode settings and
format version, and the decoding libraries' versions. Stamps, not content hashes: reading every
file to hash it costs about what decoding it costs, which would defeat the cache; and a stamp
cannot be faked by `cp -p`/`rsync -a` (they keep size and mtime, but the ctime and inode are
new). So a changed, added or removed file changes the key and the collection is decoded again.
The stamps are taken once; each file is stamped again right after it is read (a picture: by
`fstat` of the file it was read from), and a file whose stamp changed in between is refused, so
what is stored is the version the key names.
The store key of the embeddings is different: a content digest of the decoded rows and labels
(`manifest["source"]["sha256"]`, `_content_sha256`), so a re-decode that yields the same pixels
re-embeds nothing.

Decoding writes into a temporary folder: DataLoader workers write each row straight into its
split's `.npy` file (`os.pwrite` at its position, so RAM stays bounded and no image crosses
processes) and send back its digest; the folder is installed by one rename under the
collection's lock, the manifest written last. A folder without a manifest whose key matches
is never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import xxhash
from torch.utils.data import DataLoader, Dataset

from cbmir.data.collection import Collection, Row, check_collection, gc_paused, listing
from cbmir.data.decode import (
    VOLUME_KINDS,
    DecodeError,
    DecodeSettings,
    Header,
    fit,
    kind_of,
    picture_name,
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
_MAX_CHUNK = 64  # rows per DataLoader batch (`_chunk_size`)


def _versions(path: Path) -> list[list[int]]:
    """The stamps that a row's content depends on (a DICOM folder: itself and every slice):
    `cbmir.io_utils.file_version` without the real path (the row's path is in the key already,
    and resolving every path costs a stat per path component). One `stat` per file: the warm
    cache check is this, for every row."""
    try:
        st = os.stat(path)
        stamps = [_stamp(st)]
        if stat.S_ISDIR(st.st_mode):
            stamps += [_versions(p)[0] for p in sorted(path.iterdir()) if p.is_file()]
    except FileNotFoundError:
        raise DataError(f"{path} disappeared while the collection was read; run again.") from None
    return stamps


def _stamp(st: os.stat_result) -> list[int]:
    """The fields of `cbmir.io_utils.file_version` but the path, from a `stat` result."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


@cache
def _library_versions() -> dict[str, str | None]:
    """The decoders' versions (None: not installed; then no file of theirs decodes); read once
    per process, as the modules that decode are imported once."""
    return {name: _version(name) for name in ("pillow", "pydicom", "nibabel", "numpy", "torch")}


def _version(name: str) -> str | None:
    """`importlib.metadata.version(name)`, from the `Version:` line of the distribution's
    METADATA headers: `version` parses the whole file as an e-mail (torch's holds its README),
    most of a fresh process's cache check."""
    try:
        text = distribution(name).read_text("METADATA") or ""
    except PackageNotFoundError:
        return None
    for line in text.splitlines():
        if not line:  # end of the headers
            break
        if line.startswith("Version:"):
            return line[len("Version:") :].strip()
    return version(name)


def row_stamps(collection: Collection) -> list[list[list[int]]]:
    """Each row's `_versions`, in row order (one `stat` per file, of its path string): a file's
    inline, as this loop is most of the warm cache check."""
    stamps = []
    for row in collection.rows:
        try:
            st = os.stat(row.file)
        except FileNotFoundError:
            st = None  # `_versions` says so
        if st is None or stat.S_ISDIR(st.st_mode):
            stamps.append(_versions(row.path))
        else:
            stamps.append([_stamp(st)])
    return stamps


@gc_paused()
def collection_key(
    collection: Collection,
    settings: DecodeSettings,
    on_error: str,
    stamps: list[list[list[int]]] | None = None,
) -> str:
    """sha256 of everything that decides the decoded arrays (the module's docstring); `stamps`
    when the caller has them already (`row_stamps`)."""
    stamps = row_stamps(collection) if stamps is None else stamps
    record = {
        "cache_format": CACHE_FORMAT,
        "decode": settings.identity(),
        "on_error": on_error,
        "libraries": _library_versions(),
        "label_names": collection.label_names,
        "multilabel": collection.multilabel,
        "rows": [  # labels as tuples: JSON writes them as lists, the same text
            [r.file, r.labels, r.split, s] for r, s in zip(collection.rows, stamps, strict=True)
        ],
    }
    text = json.dumps(record, sort_keys=True, check_circular=False)  # same text, faster
    return hashlib.sha256(text.encode()).hexdigest()


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


class _Done(NamedTuple):
    """What decoding one row reports to the writer: small, so that DataLoader workers send
    almost nothing through their pipes. `array` travels only when the writer must decide what
    to do with it (the first readable row, a colour row in a so far grey collection)."""

    index: int
    changed: bool  # the file's stamp differs from the key's: it changed since it was listed
    error: str | None = None
    volume: bool = False
    color: bool = False
    shape: tuple[int, ...] = ()  # without the colour axis
    digest: bytes = b""  # `_row_digest` of the decoded row
    array: np.ndarray | None = None


def _row_digest(array: np.ndarray) -> bytes:
    """xxh3_128 of one decoded row as `fit(color=False)` gives it (shape and pixels): what the
    stored row is made of (a grey row of a colour collection is stored as its grey repeated).

    A 128-bit non-cryptographic digest is enough here: it tells a re-decode that yields the
    same pixels from one that does not, for the user's own files, not an adversary's (whoever
    can craft colliding files can as well change the files themselves); two different rows
    share it by accident with a chance of about 2^-128. sha256 of a 224 px RGB row cost
    ~110 us, a twentieth of the whole decode; xxh3 ~20 us."""
    digest = xxhash.xxh3_128(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.digest()


class _RowFile:
    """Rows written into an existing `.npy` file by position (`os.pwrite`), by whichever
    process decoded them: no decoded row crosses processes, and a full disk is an OSError, not
    a SIGBUS as through a memmap. Each process opens the file itself."""

    def __init__(self, path: Path) -> None:
        head = np.load(path, mmap_mode="r")
        self.path, self.offset, self.row_shape = path, head.offset, head.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape))
        del head
        self._fd: int | None = None
        self._pid: int | None = None

    def write(self, index: int, row: np.ndarray) -> None:
        if self._pid != os.getpid():  # a worker: its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_WRONLY), os.getpid()
        assert self._fd is not None and row.shape == self.row_shape and row.dtype == np.uint8
        view = memoryview(np.ascontiguousarray(row)).cast("B")
        start, done = self.offset + index * self.row_bytes, 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], start + done)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None


class _Items(Dataset):
    """Rows decoded (in DataLoader workers, or in this process), checked against the stamps of
    the key, hashed, and written straight into their split's `.npy` file when they fit `plan`.

    Rows come resized but never colour-expanded: whether the collection is colour is known
    only once every item is decoded, and the writer widens grey files into RGB itself.
    """

    def __init__(
        self,
        rows: list[Row],
        stamps: list[list[list[int]]],
        slots: list[tuple[str, int]],
        settings: DecodeSettings,
    ) -> None:
        self.rows, self.stamps, self.slots, self.settings = rows, stamps, slots, settings
        self.plan: _Plan | None = None
        self.files: dict[str, _RowFile] = {}  # split -> its image file, once `plan` is known

    def __len__(self) -> int:
        return len(self.rows)

    def decode(self, index: int) -> _Done:
        """One row, with its array; `changed` when the file is not the version the key names
        (checked after reading it: what was read is that version, or the row is refused).

        A picture is opened here and read from that descriptor alone, then stamped by `fstat`
        of it: the stamp of the very file that was read, whatever happened to its path
        meanwhile, and no path lookup (after a decode, each cost several times an idle
        one). Anything else (or a picture that will not open: a folder so named, a vanished
        file) is stamped by path after it was read."""
        path = self.rows[index].path
        if picture_name(path):
            try:
                opened = open(path, "rb")  # noqa: SIM115 (closed below, after its fstat)
            except OSError:
                return self._decode(index, path, kind_of(path), None)
            with opened:
                return self._decode(index, path, "picture", opened)
        return self._decode(index, path, kind_of(path), None)

    def _decode(self, index: int, path: Path, kind: str, opened: BinaryIO | None) -> _Done:
        volume = kind in VOLUME_KINDS
        try:
            item = read_item(path, self.settings.window, kind, opened)
        except DecodeError as exc:
            return _Done(index, self._changed(index, opened), str(exc), volume)
        array = fit(item, self.settings, False, volume)
        color = not volume and array.ndim == 3
        shape = tuple(array.shape[:3] if volume else array.shape[:2])  # no colour axis
        changed = self._changed(index, opened)
        return _Done(index, changed, None, volume, color, shape, _row_digest(array), array)

    def _changed(self, index: int, opened: BinaryIO | None) -> bool:
        """Whether what was read differs from the version the key names: by the open file's
        own stamp (`fstat`) when it was read through `opened`, else by path."""
        if opened is not None:
            return [_stamp(os.fstat(opened.fileno()))] != self.stamps[index]
        try:
            return _versions(self.rows[index].path) != self.stamps[index]
        except DataError:  # disappeared
            return True

    def __getitem__(self, index: int) -> _Done:
        done = self.decode(index)
        plan, array = self.plan, done.array
        if array is None or plan is None or done.changed:
            return done
        if not plan.admits(done.shape, done.volume):
            return done._replace(array=None)  # the writer explains the misfit from the shape
        if done.color and not plan.color:
            return done  # the writer widens the files to RGB first
        split, position = self.slots[index]
        self.files[split].write(
            position, _as_rgb(array) if plan.color and not done.color else array
        )
        return done._replace(array=None)

    def close(self) -> None:
        for out in self.files.values():
            out.close()


def _chunk_size(rows: int, workers: int) -> int:
    """Rows per DataLoader batch. Each batch costs the loader's bookkeeping (a profiler
    record, an index message, a pickled result) in the main process, which shares the CPUs
    with the workers: 16 rows a batch made that a tenth of a worker's time on 2 cores. Large
    batches pay it once per many files; a small collection still gets four batches per worker,
    and at most a few batches of rows are redone after a widening."""
    return max(1, min(_MAX_CHUNK, rows // (4 * max(1, workers))))


@dataclass
class _Plan:
    """The stored item shape, learned from the first decoded item (or `data.size`)."""

    shape: tuple[int, ...]  # (H, W) or (D, H, W), without the colour axis
    color: bool
    volume: bool

    @property
    def stored(self) -> tuple[int, ...]:
        return self.shape + ((3,) if self.color else ())

    def admits(self, shape: tuple[int, ...], volume: bool) -> bool:
        """Same kind (2D/3D) and size; colour may differ (grey is broadcast, see `_Writer`)."""
        return volume == self.volume and shape == self.shape


class _Failures:
    """Unreadable files: raised together (on_error=stop) or skipped and listed (skip)."""

    def __init__(self, on_error: str, source: Path) -> None:
        self.on_error, self.source, self.errors = on_error, source, {}

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
    headers: dict[Path, Header] = {}
    for row in collection.rows:
        with contextlib.suppress(DecodeError):  # unreadable files are not the point here
            headers[row.path] = read_header(row.path)
    if len({h.volume for h in headers.values()}) > 1:
        volumes = [p for p, h in headers.items() if h.volume]
        raise DataError(
            f"{collection.source} mixes 2D images and volumes "
            f"({listing(volumes, 'volumes')}); one kind per collection."
        )
    shapes: dict[tuple[int, ...], list[Path]] = {}
    for item, header in headers.items():
        shapes.setdefault(header.shape, []).append(item)
    if len(shapes) > 1:
        examples = ", ".join(f"{p[0]}: {' x '.join(map(str, s))}" for s, p in shapes.items())
        raise DataError(
            f"{collection.source}: the images have {len(shapes)} different sizes (e.g. "
            f"{examples[:400]}); set data.size=N to resize them all to N x N "
            f"(data.resize=squash|pad|shortest)."
        )
    raise DataError(  # headers agree, pixels do not: name the file itself
        f"{collection.source}: {path} decodes to {' x '.join(map(str, found))}, the others to "
        f"{' x '.join(map(str, plan.shape))}; set data.size=N to resize them all to N x N."
    )


class _Writer:
    """Decoded rows into each split's `.npy` file at their own position, in one pass over all
    splits (one set of workers), with the shape learned while decoding: from the first readable
    row (decoded here, before any worker starts) or `data.size`. Workers write the rows that
    fit; a colour row arriving in a so far grey collection comes here, the workers are stopped,
    every file is turned into RGB (grey repeated, as `fit` does) under a new name (a worker
    that outlived its stop can only reach the old one), and the decoding goes on after that row
    with fresh workers."""

    def __init__(self, collection: Collection, out: Path) -> None:
        self.collection, self.out = collection, out
        self.plan: _Plan | None = None
        self.sizes = {s: len(collection.split_rows(s)) for s in collection.splits}
        self.taken: dict[str, dict[int, bytes]] = {s: {} for s in collection.splits}
        self.generation = 0  # of the files being written: one more per widening

    def decode(
        self,
        stamps: list[list[list[int]]],
        settings: DecodeSettings,
        workers: int,
        failures: _Failures,
    ) -> dict[str, list[int]]:
        """Decode every split into `{split}_images.npy`; {split: positions kept}."""
        from tqdm.auto import tqdm

        items = _Items(*_stored_order(self.collection.rows, stamps, list(self.sizes)), settings)
        start = 0
        with tqdm(total=len(items), desc="decoding", unit="file", mininterval=2) as bar:
            while start < len(items):
                if self.plan is None:  # the first readable row sets the shape, decoded here
                    self._take(items, items.decode(start), failures)
                    start += 1
                    bar.update(1)
                    continue
                items.plan = self.plan
                items.files = {s: self._file(s) for s in self.sizes}
                try:
                    start = self._run(items, start, workers, failures, bar)
                finally:
                    items.close()
        failures.settle()
        return self._finish()

    def _run(self, items: _Items, start: int, workers: int, failures: _Failures, bar: Any) -> int:
        """Rows from `start` on, through a DataLoader; where to go on from (all done: len)."""
        loader = DataLoader(
            items,
            batch_size=_chunk_size(len(items) - start, workers),
            sampler=range(start, len(items)),
            num_workers=workers,
            collate_fn=list,  # the rows as they came
        )
        batches = iter(loader)
        widening: _Done | None = None
        try:
            for batch in batches:
                for done in batch:
                    bar.update(1)
                    if self._widens(done):
                        widening = done
                        break
                    self._take(items, done, failures)
                if widening is not None:
                    break
        finally:
            del batches  # stops the workers now (also on an error), before any widening
        if widening is None:
            return len(items)
        self._take(items, widening, failures)
        return widening.index + 1  # the workers' later rows were written grey: redone

    def _widens(self, done: _Done) -> bool:
        """A colour row of a so far grey collection (it came back with its array)."""
        assert self.plan is not None
        return done.array is not None and done.color and not self.plan.color

    def _take(self, items: _Items, done: _Done, failures: _Failures) -> None:
        """Account for one decoded row, writing it when it came here with its array (the first
        readable row, a widening one)."""
        row = items.rows[done.index]
        if done.changed:
            raise DataError(f"{row.file} changed while the collection was decoded; run again.")
        if done.error is not None:
            failures.errors[row.path] = done.error
            return
        if self.plan is None:
            self.plan = _Plan(done.shape, done.color, done.volume)
        if not self.plan.admits(done.shape, done.volume):
            _explain_mismatch(self.collection, row.path, self.plan, done.shape)
        split, position = items.slots[done.index]
        self.taken[split][position] = done.digest
        if done.array is None:  # written by the worker
            return
        if self._widens(done):
            self._widen()
        array = done.array if done.color or not self.plan.color else _as_rgb(done.array)
        out = self._file(split)
        try:
            out.write(position, array)
        finally:
            out.close()

    def _path(self, split: str) -> Path:
        return self.out / f"{split}_images.{self.generation}.part"

    def _file(self, split: str) -> _RowFile:
        """The split's image file (created, full size and sparse, when first asked for)."""
        assert self.plan is not None
        target = self._path(split)
        if not target.exists():
            shape = (self.sizes[split], *self.plan.stored)
            np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=shape)
        return _RowFile(target)

    def _widen(self) -> None:
        """Grey -> RGB, every file with rows written so far, into the next generation's files
        (rows not yet decoded are overwritten later)."""
        assert self.plan is not None
        old = {split: self._path(split) for split in self.sizes}
        self.plan.color = True
        self.generation += 1
        for split, path in old.items():
            if self.taken[split]:
                _rewrite(path, self._path(split), None, _as_rgb)
            else:  # nothing written yet: a new empty file will do (`_file`)
                path.unlink(missing_ok=True)

    def _finish(self) -> dict[str, list[int]]:
        """Each split's file as `{split}_images.npy`, without its unreadable rows (none where no
        row is left); {split: positions kept}."""
        kept = {}
        for split, n in self.sizes.items():
            kept[split] = sorted(self.taken[split])
            path, final = self._path(split), self.out / f"{split}_images.npy"
            if not kept[split]:
                path.unlink(missing_ok=True)
            elif len(kept[split]) < n:
                _rewrite(path, final, kept[split], np.asarray)
            else:
                os.replace(path, final)
        return kept

    def digests(self, split: str) -> list[bytes]:
        """The kept rows' digests, in stored order."""
        return [self.taken[split][i] for i in sorted(self.taken[split])]


def _stored_order(
    rows: list[Row], stamps: list[list[list[int]]], splits: list[str]
) -> tuple[list[Row], list[list[list[int]]], list[tuple[str, int]]]:
    """(rows, their stamps, their (split, position)) split by split in `splits` order, each
    split in row order: the order rows are decoded in, and stored."""
    rank = {split: i for i, split in enumerate(splits)}
    order = sorted(range(len(rows)), key=lambda i: rank[rows[i].split])  # stable
    positions = {split: itertools.count() for split in splits}  # the next one in each split
    slots = [(rows[i].split, next(positions[rows[i].split])) for i in order]
    return [rows[i] for i in order], [stamps[i] for i in order], slots


def _as_rgb(rows: np.ndarray) -> np.ndarray:
    return np.repeat(rows[..., None], 3, axis=-1)


def _rewrite(
    source: Path, target: Path, keep: list[int] | None, change: Callable[[np.ndarray], np.ndarray]
) -> None:
    """`target` := `change` of the rows `keep` (None: all) of the .npy file `source`, which is
    removed; in chunks so that RAM stays bounded (skipped files compacted away, grey made
    RGB), and published by one rename."""
    old = np.load(source, mmap_mode="r")
    keep = list(range(len(old))) if keep is None else keep
    shape = change(old[:1]).shape[1:]
    tmp = target.with_name(target.name + ".tmp")
    new = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keep), *shape))
    step = max(1, _COPY_BYTES // max(1, int(np.prod(shape))))
    for start in range(0, len(keep), step):
        chunk = np.asarray(keep[start : start + step])
        new[start : start + len(chunk)] = change(old[chunk])
    del new, old
    os.replace(tmp, target)
    source.unlink()


def _content_sha256(
    digests: dict[str, list[bytes]], plan: _Plan, labels: dict[str, np.ndarray]
) -> str:
    """The decoded collection's content identity, from the rows' digests (in stored order,
    whichever worker decoded them): per split, the stored image shape, each row's
    `_row_digest` and the labels. The stored arrays are a function of exactly these (a grey
    row of an RGB collection is its grey repeated), so any changed pixel, label, shape or
    order changes it, and no second pass over the arrays is needed."""
    digest = hashlib.sha256(b"cbmir collection rows 2")  # 2: xxh3 row digests
    for split, rows in digests.items():
        split_labels = np.ascontiguousarray(labels[split], dtype=np.int64)
        head = [split, [len(rows), *plan.stored], list(split_labels.shape)]
        digest.update(json.dumps(head).encode())
        digest.update(b"".join(rows))
        digest.update(split_labels.data)
    return digest.hexdigest()


def decode_into(
    collection: Collection,
    settings: DecodeSettings,
    out: Path,
    key: str,
    stamps: list[list[list[int]]],
    *,
    workers: int = 0,
    on_error: str = "stop",
    query_split: str = "test",
    database_split: str = "train",
) -> dict[str, Any]:
    """Decode every split into the (empty) folder `out`; write the manifest last. `stamps`
    (each row's, in row order) are those `key` was made of: a row whose file no longer has
    them after it was read is refused, so what is stored is the version the key names."""
    failures = _Failures(on_error, collection.source)
    writer = _Writer(collection, out)
    positions = writer.decode(stamps, settings, workers, failures)
    kept: list[Row] = []
    for split, keep in positions.items():
        rows = collection.split_rows(split)
        kept += [rows[i] for i in keep]
    plan = writer.plan
    if plan is None or not kept:
        raise DataError(f"{collection.source}: no readable file at all.")
    final = replace(collection, rows=kept)
    check_collection(final, query_split, database_split)  # again: skips may empty a split
    labels: dict[str, np.ndarray] = {}
    for split in final.splits:
        labels[split] = np.asarray([r.labels for r in final.split_rows(split)], dtype=np.int64)
        np.save(out / f"{split}_labels.npy", labels[split])
        write_text(
            out / f"{split}_files.txt", "".join(f"{r.file}\n" for r in final.split_rows(split))
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
            "sha256": _content_sha256({s: writer.digests(s) for s in labels}, plan, labels),
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
    with gc_paused():
        check_collection(collection, query_split, database_split)
        stamps = row_stamps(collection)
        key = collection_key(collection, settings, on_error, stamps)
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
                stamps,
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
