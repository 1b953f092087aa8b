"""Lightning DataModules serving query and database splits for retrieval.

Heavy work (download, npz -> npy conversion) happens in `prepare_data` (rank 0) and is idempotent,
so `setup` on every rank only opens memory maps. Properties that need the data set themselves up
on first use, so the module also works outside a Trainer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from cbmir.config import check_choice, check_int
from cbmir.data import catalog
from cbmir.data.datasets import ArraySplitDataset
from cbmir.data.files import (
    SourceFacts,
    convert_npz_to_npy,
    download_npz,
    load_split_arrays,
    npz_path,
    read_manifest,
)
from cbmir.data.locks import UnwritableFolderError, sweep_stale
from cbmir.data.synthetic import write_synthetic_medmnist
from cbmir.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _check_split(split: str, what: str) -> str:
    return check_choice(split, catalog.SPLITS, what)


#: the settings every DataModule takes in its own signature (so Lightning records them as its
#: hyper-parameters) and passes on unchanged to `RetrievalDataModule`
SHARED_ARGS = (
    "query_split",
    "database_split",
    "batch_size",
    "num_workers",
    "pin_memory",
    "seed",
    "cache_dir",
)


def shared_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """`SHARED_ARGS` out of a subclass constructor's `locals()`, named once for all of them."""
    return {key: args[key] for key in SHARED_ARGS}


class RetrievalDataModule(L.LightningDataModule):
    """Shared machinery: one MedMNIST-layout npz, converted once, served split by split.

    Subclasses say where the npz is (`npz_file`), how to obtain it (`_fetch_source`) and what to
    expect of it (`_expected_n`, `_volumes`, `_check_manifest`).
    """

    npz_file: Path

    def __init__(
        self,
        *,
        name: str,
        query_split: str = "test",
        database_split: str = "train",
        batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        check_int(batch_size, "batch_size")
        check_int(num_workers, "num_workers", minimum=0)
        self.name = name
        self.query_split = _check_split(query_split, "query_split")
        self.database_split = _check_split(database_split, "database_split")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._predict_splits = list(dict.fromkeys([query_split, database_split]))
        self._npy_dir: Path | None = None
        self._manifest: dict[str, Any] | None = None
        self._datasets: dict[str, ArraySplitDataset] = {}

    # ------------------------------------------------------------------ subclass hooks
    def _fetch_source(self) -> None:
        """Make sure `self.npz_file` exists (download, write, or explain how to get it).

        Subclasses add the ways to obtain it; the base only insists that it is there."""
        if not self.npz_file.is_file():
            raise DataError(f"{self.npz_file} does not exist.")

    def _expected_n(self) -> dict[str, int] | None:
        return None

    def _volumes(self) -> bool | None:
        return None

    def _check_manifest(self, manifest: dict[str, Any], npy_dir: Path) -> None:
        """Raise DataError when the converted file is not what this module promises."""

    def _check_source(self, source: SourceFacts) -> None:
        """Raise DataError to refuse the source file (checked before it is converted or used)."""

    def _verified(self, manifest: dict[str, Any]) -> bool | None:
        """Whether the file is byte for byte a published one; None: nothing to compare with."""
        return None

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download/write the npz if needed and convert it to npy (rank 0; idempotent)."""
        self._prepare()

    def _prepare(self) -> Path:
        self._fetch_source()
        return convert_npz_to_npy(
            self.npz_file,
            self.cache_dir,
            self._expected_n(),
            self._volumes(),
            check_source=self._check_source,
        )

    def setup(self, stage: str | None = None) -> None:
        if self._manifest is not None:
            return
        npy_dir = self._prepare()  # cheap when prepare_data ran: a stat and a manifest read
        manifest = read_manifest(npy_dir)
        self._check_manifest(manifest, npy_dir)
        for what in ("query_split", "database_split"):
            self._require_split(getattr(self, what), manifest, what)
        for split in self._predict_splits:
            self._require_split(split, manifest, "predict_splits")
        self._npy_dir, self._manifest = npy_dir, manifest

    def _require_split(self, split: str, manifest: dict[str, Any], what: str) -> None:
        if split not in manifest["splits"]:
            raise DataError(
                f"{what}={split!r} but {self.npz_file} has no {split} split (it has "
                f"{', '.join(manifest['splits'])}). Choose one of those."
            )

    def _ready(self) -> dict[str, Any]:
        if self._manifest is None:
            self.setup()
        assert self._manifest is not None
        return self._manifest

    # ------------------------------------------------------------------ data access
    @property
    def manifest(self) -> dict[str, Any]:
        """The conversion manifest (source size, mtime, sha256, shapes, layout)."""
        return self._ready()

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits present in the file, in train/val/test order."""
        return tuple(s for s in catalog.SPLITS if s in self._ready()["splits"])

    def dataset(self, split: str) -> ArraySplitDataset:
        _check_split(split, "split")
        manifest = self._ready()
        if split not in self._datasets:
            self._require_split(split, manifest, "split")
            images, labels = load_split_arrays(self._npy_dir, split)
            dataset = ArraySplitDataset(images, labels, volume=manifest["layout"] == "volume")
            if read_manifest(self._npy_dir)["source"]["sha256"] != manifest["source"]["sha256"]:
                raise DataError(
                    f"{self.npz_file} changed while this run was using it (another run "
                    f"re-converted it); run again."
                )
            self._datasets[split] = dataset
        return self._datasets[split]

    def split_files(self, split: str) -> list[str] | None:
        """The source file of each stored item of `split`; None where rows are only indices
        (MedMNIST and `.npz` files hold no file names)."""
        return None

    def labels(self, split: str) -> np.ndarray:
        """Labels [N, L] int64 (L = 1 for single-label sets)."""
        return self.dataset(split).labels

    def images(self, split: str) -> np.ndarray:
        """The split's stored images, memory-mapped read-only (N x H x W[ x 3] or N x D x H x W)."""
        return self.dataset(split).images

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One item's image tensor shape: (C, H, W) for 2D, (D, H, W) for volumes."""
        return tuple(self._ready()["image_shape"])

    @property
    def is_volume(self) -> bool:
        return self._ready()["layout"] == "volume"

    @property
    def multilabel(self) -> bool:
        return self._ready()["label_columns"] > 1

    @property
    def label_names(self) -> dict[int, str]:
        manifest = self._ready()
        if manifest["label_columns"] > 1:
            n = manifest["label_columns"]
        else:
            n = 1 + max(int(self.labels(s).max()) for s in self.splits)
        return {i: str(i) for i in range(n)}

    @property
    def num_classes(self) -> int:
        """Number of classes (single-label) or label columns (multi-label)."""
        return len(self.label_names)

    @property
    def size(self) -> int:
        """Image side in pixels (the larger side for non-square images)."""
        return int(max(self.image_shape[-2:]))

    @property
    def is_synthetic(self) -> bool:
        """True when the file was written by cbmir-synth: its numbers mean nothing clinically."""
        return self._ready().get("synthetic") is not None

    def data_facts(self) -> dict[str, Any]:
        """What metrics.json records about the data file, read from its content: synthetic (a
        cbmir-synth marker inside the npz, whatever the config says), data_verified (matches the
        published checksum; None where none exists), and its sha256."""
        manifest = self._ready()
        return {
            "synthetic": self.is_synthetic,
            "data_verified": self._verified(manifest),
            "data_sha256": manifest["source"]["sha256"],
        }

    def identity(self, split: str) -> dict[str, Any]:
        """What identifies the data behind a split's embeddings (an embedding-cache key part).

        The source sha256 pins the content; name/size/split make keys readable. No paths: the
        same file in another folder gives the same identity.
        """
        manifest = self._ready()
        self._require_split(split, manifest, "split")
        return {
            "name": self.name,
            "size": self.size,
            "split": split,
            "n": manifest["splits"][split]["n"],
            "image_shape": list(self.image_shape),
            "layout": manifest["layout"],
            "source_sha256": manifest["source"]["sha256"],
            "synthetic": self.is_synthetic,
        }

    # ------------------------------------------------------------------ loaders
    @property
    def predict_splits(self) -> list[str]:
        """Splits served by `predict_dataloader`, in order (default: query, then database)."""
        return list(self._predict_splits)

    @predict_splits.setter
    def predict_splits(self, splits: Sequence[str]) -> None:
        splits = [splits] if isinstance(splits, str) else list(splits)
        if not splits:
            raise ConfigError("predict_splits must name at least one split.")
        for split in splits:
            _check_split(split, "predict_splits entries")
        if self._manifest is not None:
            for split in splits:
                self._require_split(split, self._manifest, "predict_splits")
        self._predict_splits = splits

    def dataloader(
        self,
        split: str,
        batch_size: int | None = None,
        shuffle: bool = False,
        persistent_workers: bool = False,
    ) -> DataLoader:
        """A loader over one split. Worker processes persist only when asked (train/val loaders,
        re-iterated every epoch); one-pass loaders (predict) release theirs when exhausted."""
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=persistent_workers and self.num_workers > 0,
            generator=generator,
        )

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader per `predict_splits` entry, in that order (a bare loader for one split)."""
        loaders = [self.dataloader(s) for s in self._predict_splits]
        return loaders[0] if len(loaders) == 1 else loaders

    def train_dataloader(self) -> DataLoader:
        """Shuffled train split (for fine-tuning)."""
        return self.dataloader("train", shuffle=True, persistent_workers=True)

    def val_dataloader(self) -> DataLoader:
        if "val" not in self.splits:
            raise DataError(f"{self.npz_file} has no val split; validation needs one.")
        return self.dataloader("val", persistent_workers=True)


class MedMNISTDataModule(RetrievalDataModule):
    """One MedMNIST dataset at one size: downloaded (or synthetic) and memory-mapped.

    An existing `{root}/{flag}[_{size}].npz` is used without any network access, once its MD5
    matches the published one (checked once per version of the file; `verify=False` uses it
    anyway and `data_facts()` records `data_verified: False`). `synthetic=True` accepts a
    cbmir-synth stand-in there instead, or writes one when the file is missing (never into
    `real_root`, $MEDMNIST_ROOT or ~/.medmnist, nor beside real files). Whether a file is
    synthetic is read from the file, so synthetic numbers cannot pass for real ones.
    `name` only changes the display name.
    """

    def __init__(
        self,
        flag: str,
        size: int = 28,
        root: str | os.PathLike = "~/.medmnist",
        name: str | None = None,
        download: bool = True,
        synthetic: bool = False,
        query_split: str = "test",
        database_split: str = "train",
        batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        verify: bool = True,
        real_root: str | os.PathLike | None = None,
    ) -> None:
        flag = catalog.check_flag_size(flag, size)
        if not isinstance(verify, bool):
            raise ConfigError(f"data.verify must be true or false, not {verify!r}.")
        super().__init__(name=name or flag, **shared_args(locals()))
        self.save_hyperparameters()
        self.flag = flag
        self._size = size
        self.root = Path(root).expanduser()
        self.download = download
        self.synthetic = synthetic
        self.verify = verify
        self.real_root = real_root
        self.npz_file = npz_path(self.root, flag, size)

    def _fetch_source(self) -> None:
        if self.npz_file.is_file():
            sweep_stale(self.npz_file)  # a killed writer's temporaries beside it
            return
        if self.synthetic:
            try:
                write_synthetic_medmnist(
                    self.root,
                    self.flag,
                    self._size,
                    seed=self.seed,
                    replace=False,  # a concurrent run may have written it meanwhile
                    real_roots=[self.real_root],
                )
            except (OSError, UnwritableFolderError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "read-only"
                raise DataError(
                    f"Cannot write the synthetic {self.flag} file into {self.root} "
                    f"({reason}); set paths.synthetic_root=DIR (or "
                    f"CBMIR_SYNTHETIC_ROOT) to a writable folder."
                ) from None
        elif self.download:
            download_npz(self.flag, self._size, self.root)
        else:
            url, _ = catalog.url_and_md5(self.flag, self._size)
            raise DataError(
                f"{catalog.paper_name(self.flag)} at {self._size} px is expected at "
                f"{self.npz_file}, which does not exist. Set data.download=true to fetch it, "
                f"download {url} into {self.root} yourself, set data.root to the folder that "
                f"holds it, or run on a synthetic stand-in (not real data) with "
                f"experiment=offline, which writes one with cbmir-synth into "
                f"paths.synthetic_root."
            )

    def _expected_n(self) -> dict[str, int]:
        return catalog.n_samples(self.flag)

    def _volumes(self) -> bool:
        return catalog.is_3d(self.flag)

    def _published_md5(self) -> str:
        return catalog.url_and_md5(self.flag, self._size)[1]

    def _check_source(self, source: SourceFacts) -> None:
        """The published MD5 decides, except for an asked-for synthetic stand-in of this very
        dataset, or when verify=False (then it is only recorded)."""
        expected = self._published_md5()
        if source.md5 == expected:
            return
        marker = source.synthetic
        if self.synthetic and marker is not None:
            if (marker.get("flag"), marker.get("size")) != (self.flag, self._size):
                raise DataError(
                    f"{source.path} is a synthetic stand-in for {marker.get('flag')} at "
                    f"{marker.get('size')} px, not {self.flag} at {self._size} px; delete it."
                )
            return
        if not self.verify:
            log.warning(
                "%s does not match the published MD5 of %s (MD5 %s, expected %s); "
                "data.verify=false: using it, recorded as data_verified=false",
                source.path,
                catalog.paper_name(self.flag),
                source.md5,
                expected,
            )
            return
        what = " (a synthetic stand-in written by cbmir-synth)" if marker is not None else ""
        raise DataError(
            f"{source.path}{what} is not the published {catalog.paper_name(self.flag)} file: "
            f"MD5 {source.md5}, expected {expected}. Delete it and download it again, or set "
            f"data.verify=false to use it anyway (recorded as data_verified=false)."
        )

    def _verified(self, manifest: dict[str, Any]) -> bool:
        return manifest["source"].get("md5") == self._published_md5()

    def _check_manifest(self, manifest: dict[str, Any], npy_dir: Path) -> None:
        is_synth = manifest.get("synthetic") is not None
        if is_synth and not self.synthetic:
            log.warning(
                "%s is a SYNTHETIC stand-in written by cbmir-synth, not the real %s: its numbers "
                "say the pipeline runs, nothing about a model. Set data.synthetic=true to say so, "
                "or delete it (and its _npy folder) to download the real file.",
                self.npz_file,
                catalog.paper_name(self.flag),
            )
        if self.synthetic and not is_synth:
            log.warning(
                "data.synthetic=true but %s holds the real %s; using it.",
                self.npz_file,
                catalog.paper_name(self.flag),
            )
        expected = list(self.image_shape)
        if manifest["image_shape"] != expected:
            raise DataError(
                f"{self.npz_file} holds images of shape {manifest['image_shape']}, expected "
                f"{expected} for {self.flag} at {self._size} px. Delete it and download it again."
            )

    @property
    def size(self) -> int:
        return self._size

    @property
    def is_volume(self) -> bool:
        return catalog.is_3d(self.flag)

    @property
    def multilabel(self) -> bool:
        return catalog.is_multilabel(self.flag)

    @property
    def label_names(self) -> dict[int, str]:
        return catalog.label_names(self.flag)

    @property
    def image_shape(self) -> tuple[int, ...]:
        s = self._size
        return (s, s, s) if catalog.is_3d(self.flag) else (catalog.n_channels(self.flag), s, s)


class NpzDataModule(RetrievalDataModule):
    """Your own npz in MedMNIST's layout (val optional); label names default to the class ids.

    `volumes` forces (True) or forbids (False) reading N x D x H x W arrays as volumes; None
    decides by shape (a last dimension of 3 means RGB). The file's sha256 is its identity; there
    is no published checksum to verify (`verify` is accepted for sweeps and changes nothing).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        size: int | None = None,
        volumes: bool | None = None,
        label_names: Mapping[int, str] | Sequence[str] | None = None,
        synthetic: bool = False,
        query_split: str = "test",
        database_split: str = "train",
        batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        verify: bool = True,
    ) -> None:
        self.npz_file = Path(path).expanduser()
        super().__init__(name=name or self.npz_file.stem, **shared_args(locals()))
        self.save_hyperparameters()
        if synthetic:
            log.info("data=npz uses %s as it is; synthetic=true is ignored", self.npz_file)
        if not verify:
            log.info("data=npz has no published checksum; verify=false changes nothing")
        self.volumes = volumes
        self._declared_size = size
        self._label_names = None if label_names is None else catalog.name_map(label_names)

    def _fetch_source(self) -> None:
        sweep_stale(self.npz_file)  # e.g. a killed `cbmir-synth --digits`
        if not self.npz_file.is_file():
            raise DataError(
                f"Expected your npz at {self.npz_file}; there is no such file. It needs keys "
                f"train_images, train_labels, test_images, test_labels (val_* optional)."
            )

    def _volumes(self) -> bool | None:
        return self.volumes

    def _check_manifest(self, manifest: dict[str, Any], npy_dir: Path) -> None:
        stored = max(manifest["image_shape"][-2:])
        if self._declared_size is not None and self._declared_size != stored:
            raise ConfigError(
                f"data.size={self._declared_size} but the images in {self.npz_file} are "
                f"{stored} px; set data.size to {stored} or null (it only names runs)."
            )
        if self._label_names is None:
            return
        if manifest["label_columns"] > 1:
            need = set(range(manifest["label_columns"]))
        else:
            need = set()
            for split in manifest["splits"]:
                need |= {int(v) for v in np.unique(load_split_arrays(npy_dir, split)[1])}
        if not need <= set(self._label_names):
            missing = sorted(need - set(self._label_names))
            raise ConfigError(
                f"label_names lacks names for class ids {missing} of {self.npz_file}."
            )

    @property
    def label_names(self) -> dict[int, str]:
        return self._label_names if self._label_names is not None else super().label_names
