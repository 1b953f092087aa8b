"""`data=folder` / `data=csv`: your own collection of image files, decoded once into the
memory-mapped cache the MedMNIST path reads (`cbmir.data.collection_cache`), then served by the
same `RetrievalDataModule` machinery: embedding, store keys, retrieval and resume are unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cbmir.config import check_choice, check_int
from cbmir.data.collection import (
    Collection,
    Columns,
    check_fractions,
    folder_collection,
    table_collection,
)
from cbmir.data.collection_cache import (
    SKIPPED,
    cache_dir_for,
    collection_key,
    prepare_collection,
    trusted,
)
from cbmir.data.datamodule import RetrievalDataModule, shared_args
from cbmir.data.decode import DecodeSettings
from cbmir.data.files import read_manifest
from cbmir.errors import ConfigError, DataError

log = logging.getLogger(__name__)

KINDS = ("folder", "csv")


class CollectionDataModule(RetrievalDataModule):
    """A class-folder tree (`kind="folder"`) or a CSV/TSV/Parquet table (`kind="csv"`).

    Decoding settings (`size`, `resize`, `window`) and `on_error` are part of the cache key;
    `split_seed`/`split_fractions` draw a split where the layout gives none (written beside the
    cache and read back by later runs). See docs/data.md.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        kind: str = "folder",
        name: str | None = None,
        size: int | None = None,
        resize: str = "squash",
        window: Sequence[float] | None = None,
        on_error: str = "stop",
        split_seed: int = 0,
        split_fractions: Mapping[str, float] | None = None,
        columns: Mapping[str, Any] | None = None,
        decode_workers: int = 0,
        query_split: str = "test",
        database_split: str = "train",
        batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        cache_dir: str | os.PathLike = "~/.cache/cbmir/collections",
        synthetic: bool = False,
        verify: bool = True,
    ) -> None:
        check_choice(kind, KINDS, "data.kind")
        check_int(decode_workers, "data.decode_workers", minimum=0)
        self.npz_file = Path(path).expanduser().absolute()  # the source, named in messages
        super().__init__(name=name or self.npz_file.stem, **shared_args(locals()))
        self.save_hyperparameters()
        self.kind = kind
        self.settings = DecodeSettings(size, resize, tuple(window) if window else None)
        self.on_error = on_error
        self.split_seed = int(split_seed)
        self.split_fractions = check_fractions(split_fractions or {"train": 0.8, "test": 0.2})
        self.columns = _columns(columns or {})
        self.decode_workers = decode_workers
        self._collection: Collection | None = None
        self._decoded: Path | None = None
        self._key: str | None = None
        if synthetic or not verify:
            log.info("data=%s uses your files as they are; synthetic/verify change nothing", kind)

    @property
    def collection(self) -> Collection:
        """The manifest rows (built once per module)."""
        if self._collection is None:
            assert self.cache_dir is not None
            split = (self.cache_dir, self.split_seed, self.split_fractions)
            if self.kind == "folder":
                self._collection = folder_collection(self.npz_file, *split)
            else:
                self._collection = table_collection(self.npz_file, self.columns, *split)
        return self._collection

    def _prepare(self) -> Path:
        if self._decoded is None:
            assert self.cache_dir is not None
            self._decoded, self._key = prepare_collection(
                self.collection,
                self.settings,
                self.cache_dir,
                self.name,
                workers=self.decode_workers,
                on_error=self.on_error,
                query_split=self.query_split,
                database_split=self.database_split,
            )
        return self._decoded

    def _check_manifest(self, manifest: dict[str, Any], npy_dir: Path) -> None:
        if manifest["source"].get("key") != self._key:  # replaced since it was prepared
            raise DataError(
                f"The decoded cache of {self.npz_file} in {npy_dir} was replaced by another run "
                f"(its files changed); run again."
            )
        if manifest.get("skipped"):
            log.warning(
                "%d unreadable files were left out of %s (data.on_error=skip): see %s",
                manifest["skipped"],
                self.npz_file,
                npy_dir / SKIPPED,
            )

    @property
    def label_names(self) -> dict[int, str]:
        return dict(enumerate(self._ready()["label_names"]))

    @property
    def skipped_files(self) -> str:
        """The list of skipped files (path<TAB>reason per line; empty when none)."""
        self._ready()
        return (self._prepare() / SKIPPED).read_text()

    def split_files(self, split: str) -> list[str]:
        """The source file of each stored item of `split`, in stored order."""
        self._ready()
        return (self._prepare() / f"{split}_files.txt").read_text().splitlines()

    def current_manifest(self) -> dict[str, Any] | None:
        """The decoded cache's manifest if it is current (no file changed), else None: what a
        reader of a finished run's outputs may trust without decoding anything."""
        assert self.cache_dir is not None
        collection = self.collection
        key = collection_key(collection, self.settings, self.on_error)
        target = cache_dir_for(collection, self.cache_dir, self.name, self.settings, self.on_error)
        return trusted(target, key)

    def input_files(self) -> list[Path]:
        """What a re-launched job must find unchanged to reuse its results: the table or folder
        tree (folders: their listing), a drawn split's file, every item's file, and each
        slice of a DICOM series folder (editing a slice in place leaves its folder's stamp)."""
        items = dict.fromkeys(r.path for r in self.collection.rows)
        slices = [p for item in items if item.is_dir() for p in sorted(item.iterdir())]
        given = [self.npz_file]  # as named: the listing is of its target, a link re-pointed
        return [*given, *self.collection.inputs, *items, *(p for p in slices if p.is_file())]

    def data_facts(self) -> dict[str, Any]:
        facts = super().data_facts()
        facts["skipped_files"] = int(read_manifest(self._prepare()).get("skipped", 0))
        return facts


def _columns(columns: Mapping[str, Any]) -> Columns:
    known = {"path", "label", "split", "labels"}
    unknown = sorted(set(columns) - known)
    if unknown:
        raise ConfigError(f"data.columns takes {', '.join(sorted(known))}, not {unknown}.")
    labels = columns.get("labels")
    return Columns(
        path=str(columns.get("path", "path")),
        label=str(columns.get("label", "label")),
        split=str(columns.get("split", "split")),
        labels=tuple(str(c) for c in labels) if labels else None,
    )
