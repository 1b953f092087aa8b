"""The only door through which fine-tuning reads data: database (train) and val splits, never
the query (test) split.

The benchmark's queries must stay unseen, so `FinetuneData` refuses a configuration where the
query split would be trained on or used for model selection, and every split it opens goes
through `_dataset`, which raises on the query split and records what was read (`reads`), so a
test can check the claim instead of trusting it.

Training order is a seeded permutation per epoch (`EpochShuffleSampler`; Lightning calls
`set_epoch`), so a fine-tune resumed from `last.ckpt` sees the same batches as one that was
never interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cbmir.config import check_int
from cbmir.data.datamodule import RetrievalDataModule
from cbmir.errors import ConfigError, DataError

VAL_SPLIT = "val"


class QuerySplitAccess(RuntimeError):
    """Fine-tuning tried to read the benchmark's query split: a bug, never a user choice."""


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch from (seed, epoch): reproducible across resumes."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class FinetuneData(L.LightningDataModule):
    """Train loader over the database split; val loaders: [val queries, database]."""

    def __init__(
        self,
        source: RetrievalDataModule,
        batch_size: int,
        eval_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.source = source
        self.query_split = source.query_split
        self.train_split = source.database_split
        self.val_split = VAL_SPLIT
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or source.batch_size)
        self.seed = int(seed)
        self.reads: list[str] = []
        check_int(self.batch_size, "finetune.batch_size", minimum=2)
        if self.query_split in (self.train_split, self.val_split):
            raise ConfigError(
                f"fine-tuning trains on data.database_split={self.train_split!r} and selects "
                f"models on {self.val_split!r}; the query split ({self.query_split!r}) must be "
                "neither, or the benchmark's queries would be seen in training"
            )
        if self.train_split == self.val_split:
            raise ConfigError(
                f"data.database_split={self.train_split!r} is also the model-selection split; "
                "fine-tune with the train split as database"
            )
        if self.val_split not in source.splits:
            raise DataError(
                f"{source.npz_file} has no {self.val_split} split ({', '.join(source.splits)}); "
                "fine-tuning selects its checkpoint on val queries against the train database"
            )

    def _dataset(self, split: str) -> Dataset:
        if split == self.query_split:
            raise QuerySplitAccess(
                f"fine-tuning must never read the query split {split!r} (train/val only)"
            )
        self.reads.append(split)
        return self.source.dataset(split)

    def labels(self, split: str) -> torch.Tensor:
        return torch.from_numpy(self._dataset(split).labels)

    def num_classes(self) -> int:
        """Classifier outputs, from the train and val labels only (a data module's own
        `num_classes` may read every split's labels, the query split's included)."""
        train = self._dataset(self.train_split).labels
        if self.source.multilabel:
            return int(train.shape[1])
        val = self._dataset(self.val_split).labels
        return 1 + int(max(train.max(), val.max()))

    def _loader(self, split: str, batch_size: int, **kwargs) -> DataLoader:
        source = self.source
        return DataLoader(
            self._dataset(split),
            batch_size=batch_size,
            num_workers=source.num_workers,
            pin_memory=torch.cuda.is_available()
            if source.pin_memory is None
            else source.pin_memory,
            persistent_workers=source.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        n = len(self._dataset(self.train_split))
        return self._loader(
            self.train_split,
            self.batch_size,
            sampler=EpochShuffleSampler(n, self.seed),
            drop_last=n > self.batch_size,  # a batch of one breaks BatchNorm and contrast
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(self.val_split, self.eval_batch_size),
            self._loader(self.train_split, self.eval_batch_size),
        ]
