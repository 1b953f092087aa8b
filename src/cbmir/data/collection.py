"""A collection's manifest: rows (file, labels, split) built from a class-folder tree
(`data=folder`) or a CSV/TSV/Parquet table (`data=csv`), and the checks every collection must
pass before anything is decoded (docs/data.md).

Row order is the decoding order and thus the stored order: sorted relative paths for a folder,
the table's row order for a CSV.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cbmir.data.catalog import SPLITS
from cbmir.errors import ConfigError, DataError
from cbmir.io_utils import write_text

log = logging.getLogger(__name__)

SHOW = 5  # files named in a message; the rest are counted
MULTI_SEPARATOR = "|"
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".parquet": None, ".pq": None}


class Row(NamedTuple):
    """One item: its file (or DICOM folder), label vector and split. A named tuple: one is
    made per file on every launch, at a third of a frozen dataclass's cost.

    The file is held as its absolute path string, what the listing, the stamps (`os.stat`)
    and the cache key (its text) use for every file on every launch; `path` makes the Path
    when a reader needs one. On Python 3.11, making and printing a Path per file cost about
    as much as the `stat` of the file (ad-hoc timing, 20,000 files)."""

    file: str
    labels: tuple[int, ...]
    split: str

    @property
    def path(self) -> Path:
        return Path(self.file)


@dataclass
class Collection:
    """Rows plus what they mean: label names, single/multi-label, the files that define it."""

    source: Path
    kind: str
    rows: list[Row]
    label_names: list[str]
    multilabel: bool
    inputs: list[Path] = field(default_factory=list)  # what a re-launch must stamp

    def split_rows(self, split: str) -> list[Row]:
        return [r for r in self.rows if r.split == split]

    @property
    def splits(self) -> list[str]:
        present = {r.split for r in self.rows}
        return [s for s in SPLITS if s in present]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while per-file records are built (also as a
    decorator). Each collection pass walks every tracked object, and these lists grow by
    thousands: at 20,000 files, in a process that had imported torch, collector passes were
    1.1-1.5 s of the warm cache check's, 0.5-0.6 s without (ad-hoc timing, 2 cores; the
    check is `scripts/bench_decode.py`'s second run). The records form no reference cycles,
    so nothing waits on the collector; it is switched back on after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def listing(paths: Sequence[object], what: str) -> str:
    """'N what: a, b, c (and M more)': the first few and a count."""
    shown = ", ".join(str(p) for p in paths[:SHOW])
    more = f" (and {len(paths) - SHOW} more)" if len(paths) > SHOW else ""
    return f"{len(paths)} {what}: {shown}{more}"


# --------------------------------------------------------------------------- splits


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """{split: fraction}, train and test > 0, summing to 1."""
    out = {str(k): float(v) for k, v in dict(fractions).items()}
    unknown = sorted(set(out) - set(SPLITS))
    if unknown or out.get("train", 0) <= 0 or out.get("test", 0) <= 0:
        raise ConfigError(
            f"data.split_fractions must give train and test (optional val) fractions > 0, not "
            f"{out}."
        )
    if any(v < 0 for v in out.values()) or abs(sum(out.values()) - 1.0) > 1e-6:
        raise ConfigError(f"data.split_fractions must be >= 0 and sum to 1, not {out}.")
    return out


def draw_split(
    keys: Sequence[str], strata: Sequence[object], seed: int, fractions: Mapping[str, float]
) -> dict[str, str]:
    """{key: split}, stratified: within each stratum (class), the items in a seeded random
    order, the first round(n x test) to test, the next round(n x val) to val, the rest train."""
    rng = np.random.default_rng(seed)
    by_stratum: dict[str, list[str]] = {}
    for key, stratum in zip(keys, strata, strict=True):
        by_stratum.setdefault(json.dumps(stratum), []).append(key)
    out: dict[str, str] = {}
    for stratum in sorted(by_stratum):
        members = sorted(by_stratum[stratum])
        order = [members[i] for i in rng.permutation(len(members))]
        n_test = round(len(order) * fractions.get("test", 0))
        n_val = round(len(order) * fractions.get("val", 0))
        for i, key in enumerate(order):
            out[key] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def split_file(cache_dir: Path, source: Path, seed: int, fractions: Mapping[str, float]) -> Path:
    """Where a drawn split is written and found again: one file per source, seed, fractions."""
    ident = json.dumps([os.path.realpath(source), seed, sorted(fractions.items())])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return cache_dir / f"{source.name}-split-{digest}.csv"


def drawn_split(
    files: Sequence[str],
    strata: Sequence[object],
    cache_dir: Path,
    source: Path,
    seed: int,
    fractions: Mapping[str, float],
) -> tuple[dict[str, str], Path]:
    """{file: split} of `files`: read back from its split file when one exists (it must list
    the same files), else drawn and written there (path,split per line, atomically)."""
    import pandas as pd

    target = split_file(cache_dir, source, seed, fractions)
    if target.is_file():
        table = pd.read_csv(target, dtype=str, keep_default_na=False)
        saved = dict(zip(table["path"], table["split"], strict=True))
        now = set(files)
        added, removed = sorted(now - set(saved)), sorted(set(saved) - now)
        if added or removed:
            raise DataError(
                f"{source} changed since its split was drawn into {target} ("
                + "; ".join(listing(x, w) for x, w in ((added, "added"), (removed, "removed")) if x)
                + f"). Delete {target} to draw a new split, or give the split yourself."
            )
        log.info("split of %s read from %s", source, target)
        return saved, target
    drawn = draw_split(files, strata, seed, fractions)
    lines = ["path,split"] + [f"{_csv_field(p)},{s}" for p, s in drawn.items()]
    write_text(target, "\n".join(lines) + "\n")
    log.info("split of %s drawn (seed %d, %s) and written to %s", source, seed, fractions, target)
    return drawn, target


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


# --------------------------------------------------------------------------- folder


def _entries(folder: Path) -> list[os.DirEntry]:
    """The visible entries of `folder` in the order of their Paths (one folder: by name).

    One `os.scandir` pass: it tells folders from files without a stat per entry, and sorting
    names is much cheaper than sorting Paths (this listing runs on every launch)."""
    with os.scandir(folder) as found:
        return sorted((e for e in found if not e.name.startswith(".")), key=lambda e: e.name)


def _children(folder: Path) -> list[str]:
    """The visible entries of `folder` as absolute path strings, ordered by name as `_entries`
    orders them: names joined to the folder's text, the text `folder / name` would print,
    without a Path per entry (the bulk of listing a large class folder)."""
    prefix = os.path.join(folder, "")
    return [prefix + name for name in sorted(os.listdir(folder)) if not name.startswith(".")]


def _class_items(split_dir: Path) -> list[tuple[str, list[str]]]:
    """(class name, its items in name order) per class folder under `split_dir` that holds
    items, in name order; a file beside the class folders is an error (it has no class)."""
    classes = _entries(split_dir)
    loose = [Path(e.path) for e in classes if not e.is_dir()]
    if loose:
        raise DataError(
            f"{split_dir} holds files outside any class folder ({listing(loose, 'files')}); "
            f"expected {split_dir}/<class>/<file>."
        )
    found = [(c.name, _children(Path(c.path))) for c in classes]
    return [(name, items) for name, items in found if items]


@gc_paused()
def folder_collection(
    root: Path, cache_dir: Path, seed: int, fractions: Mapping[str, float]
) -> Collection:
    """`root/<split>/<class>/<file>`, or `root/<class>/<file>` with a drawn split."""
    root = root.resolve()  # once: items are listed from it, so their paths are absolute too
    if not root.is_dir():
        raise DataError(
            f"data.path={root} is not a folder; data=folder expects DIR/<class>/<file>"
            f" or DIR/<split>/<class>/<file>."
        )
    entries = _entries(root)
    top = [Path(e.path) for e in entries]
    split_dirs = [Path(e.path) for e in entries if e.is_dir() and e.name in SPLITS]
    inputs: list[Path] = [root]
    if split_dirs:
        others = [p.name for p in top if p not in split_dirs]
        if others:
            raise DataError(
                f"{root} mixes split folders ({', '.join(p.name for p in split_dirs)}) with "
                f"{listing(others, 'other entries')}; use DIR/<split>/<class>/<file> only."
            )
        groups = []  # (split, class, items), in Path order
        for d in split_dirs:
            found = _class_items(d)
            groups += [(d.name, cls, items) for cls, items in found]
            inputs += [d, *(d / cls for cls, _ in found)]
        split_of = None
    else:
        found = _class_items(root)
        groups = [("", cls, items) for cls, items in found]
        files = [f for _, items in found for f in items]
        strata = [cls for cls, items in found for _ in items]
        split_of, split_path = drawn_split(files, strata, cache_dir, root, seed, fractions)
        inputs += [*(root / cls for cls, _ in found), split_path]
    if not groups:
        raise DataError(f"{root} holds no images; expected DIR/<class>/<file>.")
    names = sorted({cls for _, cls, _ in groups})
    ids = {name: i for i, name in enumerate(names)}
    # already in sorted-path order: folders then files, each listed by name (`_entries`)
    rows = []
    for split, cls, items in groups:
        label = (ids[cls],)  # one tuple per class, shared by its rows
        if split_of is None:
            rows += [Row(file, label, split) for file in items]
        else:
            rows += [Row(file, label, split_of[file]) for file in items]
    return Collection(root, "folder", rows, names, False, sorted(set(inputs)))


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Columns:
    """Column names of a table collection."""

    path: str = "path"
    label: str = "label"
    split: str = "split"
    labels: tuple[str, ...] | None = None  # multi-label: one 0/1 column per label


def read_table(path: Path):
    """A CSV, TSV or Parquet file as a pandas DataFrame of strings (Parquet keeps its types)."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ConfigError(f"data.path={path}: expected a {', '.join(TABLE_SUFFIXES)} file.")
    if not path.is_file():
        raise DataError(f"data.path={path} does not exist.")
    try:
        if TABLE_SUFFIXES[suffix] is None:
            return pd.read_parquet(path)
        return pd.read_csv(path, sep=TABLE_SUFFIXES[suffix], dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas' parser errors have many types
        raise DataError(f"{path} is not a readable table ({type(exc).__name__}: {exc}).") from None


def _cells(frame, column: str) -> list[str]:
    return [
        "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip()
        for v in frame[column].tolist()
    ]


def _require_columns(frame, path: Path, needed: Iterable[str]) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} lacks the column(s) {', '.join(missing)}; it has "
            f"{', '.join(map(str, frame.columns))}. Name them with data.columns.*."
        )


def _single_labels(cells: list[str]) -> tuple[list[tuple[int, ...]], list[str]]:
    """Integers are class ids as they are (names = the ids); other names are sorted to ids."""
    if all(c.lstrip("-").isdigit() for c in cells):
        values = [int(c) for c in cells]
        if min(values) < 0:
            raise DataError("labels must be class ids >= 0 or class names.")
        return [(v,) for v in values], [str(i) for i in range(max(values) + 1)]
    names = sorted(set(cells))
    ids = {n: i for i, n in enumerate(names)}
    return [(ids[c],) for c in cells], names


def _multi_names(cells: list[str]) -> tuple[list[tuple[int, ...]], list[str]]:
    sets = [{p.strip() for p in c.split(MULTI_SEPARATOR) if p.strip()} for c in cells]
    names = sorted(set().union(*sets))
    return [tuple(int(n in s) for n in names) for s in sets], names


def _multi_columns(frame, path: Path, columns: Sequence[str]) -> list[tuple[int, ...]]:
    _require_columns(frame, path, columns)
    rows = list(zip(*[_cells(frame, c) for c in columns], strict=True))
    bad = [i + 2 for i, r in enumerate(rows) if any(v not in ("0", "1", "0.0", "1.0") for v in r)]
    if bad:
        raise DataError(
            f"{path}: label columns must hold 0 or 1; not so on {listing(bad, 'lines')}."
        )
    return [tuple(int(float(v)) for v in r) for r in rows]


@gc_paused()
def table_collection(
    path: Path, columns: Columns, cache_dir: Path, seed: int, fractions: Mapping[str, float]
) -> Collection:
    """Rows of a table; paths relative to its folder unless absolute; no split column: drawn."""
    frame = read_table(path)
    if len(frame) == 0:
        raise DataError(f"{path} lists no files.")
    needed = [columns.path] + ([] if columns.labels else [columns.label])
    _require_columns(frame, path, needed)
    files = [Path(c).expanduser() for c in _cells(frame, columns.path)]
    files = [(f if f.is_absolute() else path.parent / f) for f in files]
    if columns.labels:
        labels, names = _multi_columns(frame, path, columns.labels), list(columns.labels)
    else:
        cells = _cells(frame, columns.label)
        empty = [str(f) for f, c in zip(files, cells, strict=True) if not c]
        if empty:
            raise DataError(f"{path}: the label is missing for {listing(empty, 'files')}.")
        multi = any(MULTI_SEPARATOR in c for c in cells)
        labels, names = _multi_names(cells) if multi else _single_labels(cells)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(f"{path} names files that do not exist: {listing(missing, 'paths')}.")
    inputs = [path]
    if columns.split in frame.columns:
        splits = _cells(frame, columns.split)
        bad = sorted({s for s in splits if s not in SPLITS})
        if bad:
            raise DataError(
                f"{path}: column {columns.split} holds {bad}; expected {', '.join(SPLITS)}."
            )
    else:
        texts = [str(f) for f in files]
        split_of, split_path = drawn_split(texts, labels, cache_dir, path, seed, fractions)
        splits = [split_of[f] for f in texts]
        inputs.append(split_path)
    rows = [  # absolute, `..` folded without a stat per path component
        Row(os.path.abspath(f), lab, s) for f, lab, s in zip(files, labels, splits, strict=True)
    ]
    if not rows:
        raise DataError(f"{path} lists no files.")
    multilabel = bool(columns.labels) or len(rows[0].labels) > 1
    return Collection(path, "csv", rows, names, multilabel, inputs)


# --------------------------------------------------------------------------- checks


def check_collection(collection: Collection, query_split: str, database_split: str) -> None:
    """What every collection must satisfy before decoding (and again after skipped files):
    train and test (and every split asked for) hold images, no query class is absent from the
    database (such queries could never find a relevant item)."""
    src = collection.source
    for split in dict.fromkeys(["train", "test", query_split, database_split]):
        if not collection.split_rows(split):
            raise DataError(
                f"{src}: the {split} split has no images (it has "
                + ", ".join(f"{s}: {len(collection.split_rows(s))}" for s in collection.splits)
                + ")."
            )
    database = collection.split_rows(database_split)
    queries = collection.split_rows(query_split)
    if collection.multilabel:
        known = np.asarray([r.labels for r in database], dtype=bool).any(axis=0)
        lost = np.asarray([r.labels for r in queries], dtype=bool) & ~known
        orphans = [collection.label_names[i] for i in np.flatnonzero(lost.any(axis=0))]
    else:
        seen = {r.labels[0] for r in database}
        orphans = [_name(collection, r.labels[0]) for r in queries if r.labels[0] not in seen]
    if orphans:
        classes = sorted(set(orphans))
        raise DataError(
            f"{src}: {listing(classes, 'classes')} appear only in the {query_split} split, "
            f"never in the {database_split} split; their queries could never find a match. "
            f"Move some of their images to {database_split}."
        )


def _name(collection: Collection, label: int) -> str:
    names = collection.label_names
    return names[label] if label < len(names) else str(label)
