"""One job across many devices: Lightning DDP for the embedding stage, one rank for the rest.

`cbmir trainer.devices=N trainer.strategy=ddp` runs N processes. Lightning starts ranks > 0 by
re-running the same command (or SLURM's `srun` starts every rank), so each of them passes
through the whole pipeline up to `trainer.predict`: only the launch-primary process (global
rank 0) holds the job directory, decides resume and writes outputs (`is_launch_primary`).

Embedding: Lightning's predict loop gives each rank a disjoint part of every split
(`UnrepeatedDistributedSampler`). Rank 0 opens the store entries (one locked temporary
directory each, as in a one-device run) and sends their paths to every rank; each rank appends
its rows (dataset indices) and embeddings to its own shard files in that directory (no two
processes write the same file, which also holds on network filesystems). After a barrier rank 0
checks that every row was written exactly once, assembles the entry and publishes it. Any error,
on any rank, leaves no published entry: the failing rank removes the temporaries itself (the
launcher then kills the other ranks), rank 0 aborts its writers, and a rank killed outright
leaves a temporary without a live lock holder, which the next run removes
(`EmbeddingStore.remove_stale_temps`).

Retrieval and metrics run once, on rank 0, on the published entries: the outputs are those of a
one-device run by construction (the search is a small part of a job's time; docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch.distributed as dist

from cbmir.config import is_multirun
from cbmir.embedding import EmbeddingStoreWriter, PlannedEntry
from cbmir.errors import ConfigError, EmbeddingError
from cbmir.resume import hold_job_dir
from cbmir.store import EmbeddingStore, EntryWriter, checked_batch

#: rows copied from the shards into an entry at a time (bounds rank 0's memory)
MERGE_CHUNK = 65536


def is_launch_primary(env: Mapping[str, str] | None = None) -> bool:
    """True in the process that will be global rank 0, decided before any Trainer exists.

    Lightning's launcher gives the processes it starts LOCAL_RANK (and NODE_RANK); torchrun
    sets RANK; `srun` sets SLURM_PROCID for each of several tasks. A single-task SLURM job (the
    launcher then starts the other local ranks) has SLURM_PROCID=0 in every process, hence the
    task-count check.
    """
    env = os.environ if env is None else env
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if int(env.get("LOCAL_RANK", 0)) > 0 or int(env.get("NODE_RANK", 0)) > 0:
        return False
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]) == 0
    return True


def may_span_devices(trainer_cfg: Mapping[str, Any]) -> bool:
    """True when a trainer config can start more than one process (devices or nodes)."""
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if not isinstance(devices, (str, int)):  # a list of device ids (ListConfig too)
        many = len(devices) > 1
    else:
        many = str(devices) in {"auto", "-1"} or (str(devices).isdigit() and int(devices) > 1)
    return many or nodes > 1


def check_launch(trainer_cfg: Mapping[str, Any], multirun: bool | None = None) -> None:
    """Refuse DDP inside a Hydra multirun: the launcher re-runs the command for ranks > 0 with
    the single-run directory, so the ranks of one sweep job would land in different places."""
    multirun = is_multirun() if multirun is None else multirun
    if multirun and may_span_devices(trainer_cfg):
        raise ConfigError(
            f"trainer.devices={trainer_cfg.get('devices')} / trainer.num_nodes="
            f"{trainer_cfg.get('num_nodes', 1)} in a multirun: a sweep runs one job per device "
            "(trainer.devices=1, spread jobs with hydra/launcher=slurm); run one job with "
            "many devices without -m (docs/scaling.md)"
        )


@contextlib.contextmanager
def hold_job_dir_once(job_dir: Path) -> Iterator[None]:
    """`resume.hold_job_dir` in the launch-primary process only: ranks > 0 run the same job
    while rank 0 holds it, so taking the lock there would wait for ever."""
    with hold_job_dir(job_dir) if is_launch_primary() else contextlib.nullcontext():
        yield


def part_ranks(trainer: L.Trainer) -> bool:
    """End the process group once the entries are published; True on rank 0, which goes on
    alone (a search and metrics in a live group would wait for the other ranks: torchmetrics
    syncs its states across an initialised group)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return trainer.is_global_zero


class ShardWriter:
    """One rank's rows of one entry: dataset indices and float32 embeddings, appended to two
    raw files as batches arrive (nothing held in memory)."""

    def __init__(self, directory: Path, rank: int, dim: int) -> None:
        self.rows_path = directory / f"shard-{rank:05d}.rows"
        self.values_path = directory / f"shard-{rank:05d}.f32"
        self.dim = dim
        self._rows = open(self.rows_path, "wb")  # noqa: SIM115 - closed in close()
        self._values = open(self.values_path, "wb")  # noqa: SIM115

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        values = checked_batch(rows, values, self.dim)
        self._rows.write(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
        self._values.write(np.ascontiguousarray(values).tobytes())

    def close(self) -> None:
        for handle in (self._rows, self._values):
            if not handle.closed:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()


def read_shards(directory: Path, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, embeddings) of every shard in `directory`, the embeddings memory-mapped."""
    for rows_path in sorted(directory.glob("shard-*.rows")):
        rows = np.fromfile(rows_path, dtype=np.int64)
        values_path = rows_path.with_suffix(".f32")
        expected = len(rows) * dim * 4
        if values_path.stat().st_size != expected:
            raise EmbeddingError(f"{values_path} holds {values_path.stat().st_size} bytes, "
                                 f"expected {expected}")  # fmt: skip
        values = (
            np.memmap(values_path, dtype=np.float32, mode="r", shape=(len(rows), dim))
            if len(rows)
            else np.zeros((0, dim), np.float32)
        )
        yield rows, values


def merge_shards(writer: EntryWriter, n_ranks: int) -> None:
    """Copy every rank's shard into the entry, after checking that each row of the split was
    embedded exactly once (a missing or doubled row means the ranks did not split the data
    the way the entry needs)."""
    n_rows, dim = len(writer.written), writer.dim
    counts = np.zeros(n_rows, dtype=np.int64)
    shards = list(read_shards(writer.tmp, dim))
    if len(shards) != n_ranks:
        raise EmbeddingError(f"{len(shards)} of {n_ranks} ranks left rows in {writer.tmp}")
    for rows, _ in shards:
        if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
            raise EmbeddingError(f"a rank wrote rows outside 0..{n_rows - 1}")
        counts += np.bincount(rows, minlength=n_rows)
    if (counts != 1).any():
        raise EmbeddingError(
            f"{int((counts == 0).sum())} rows never embedded and {int((counts > 1).sum())} "
            "embedded more than once across the ranks; the entry is discarded"
        )
    for rows, values in shards:
        for start in range(0, len(rows), MERGE_CHUNK):
            chunk = slice(start, start + MERGE_CHUNK)
            writer.write(rows[chunk], np.asarray(values[chunk]))
    for path in writer.tmp.glob("shard-*"):
        path.unlink()


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class DistributedStoreWriter(EmbeddingStoreWriter):
    """`EmbeddingStoreWriter` that also serves DDP: with one process it is exactly the parent;
    with several, ranks write shards into rank 0's temporary entries and rank 0 publishes each
    entry once, after every rank has finished (see the module docstring)."""

    def __init__(self, store: EmbeddingStore, plan: list[PlannedEntry]) -> None:
        super().__init__(store, plan)
        self.shards: list[ShardWriter] = []
        self.temps: list[Path] = []
        self._ends: dict[int, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Every rank must embed the same entries: each decided from the store on its own, so
        a job publishing one of them meanwhile could make them differ."""
        if trainer.world_size > 1:
            keys = [p.key for p in self.plan]
            if any(other != keys for other in _all_gather(keys, trainer.world_size)):
                raise EmbeddingError(
                    "the ranks found different embeddings missing from the store (another job "
                    "published some meanwhile); run the job again"
                )

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            return super().on_predict_start(trainer, pl_module)
        if trainer.is_global_zero:
            super().on_predict_start(trainer, pl_module)
            temps = [str(w.tmp) for w in self.writers if w is not None]
        else:
            temps = None
        self.temps = [Path(t) for t in trainer.strategy.broadcast(temps, src=0)]
        visible = all(t.is_dir() for t in self.temps)
        if not all(_all_gather(visible, trainer.world_size)):
            raise EmbeddingError(
                f"not every rank sees the store {self.store.root}: with trainer.num_nodes > 1 "
                "paths.store must be on a filesystem shared by all nodes"
            )
        rank = trainer.global_rank
        self.shards = [
            ShardWriter(t, rank, p.dim) for t, p in zip(self.temps, self.plan, strict=True)
        ]
        self._ends = {}
        self._last_end = time.perf_counter()

    def _write_rows(
        self, trainer: L.Trainer, index: int, rows: np.ndarray, values: np.ndarray
    ) -> None:
        if trainer.world_size == 1:
            return super()._write_rows(trainer, index, rows, values)
        self.shards[index].write(rows, values)
        self._ends[index] = time.perf_counter()

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            return super().on_predict_epoch_end(trainer, pl_module)
        for shard in self.shards:
            shard.close()
        trainer.strategy.barrier("cbmir-shards-written")
        error = self._publish_all(trainer.world_size) if trainer.is_global_zero else None
        error = trainer.strategy.broadcast(error, src=0)
        self.shards, self.temps = [], []
        if error is not None:
            raise EmbeddingError(error)

    def _publish_all(self, world_size: int) -> str | None:
        """Rank 0: merge and publish every entry; the first error aborts the unpublished ones
        and is returned, so that every rank can raise it."""
        try:
            for index, writer in enumerate(self.writers):
                assert writer is not None
                merge_shards(writer, world_size)
                last = index + 1 == len(self.writers)
                self._publish(index, None if last else self._ends.get(index, self._last_end))
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it
            self._abort_all()
            return str(exc) if isinstance(exc, EmbeddingError) else f"{type(exc).__name__}: {exc}"
        self.writers = []
        return None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.world_size == 1:
            return super().on_exception(trainer, pl_module, exception)
        for shard in self.shards:
            with contextlib.suppress(OSError):
                shard.close()
        self._abort_all()  # rank 0: its writers
        for temp in self.temps:  # any rank: the shared temporaries, before the launcher
            shutil.rmtree(temp, ignore_errors=True)  # kills the other ranks
        self.shards, self.temps = [], []
        if trainer.is_global_zero:  # ranks > 0 would wait in a collective for ever
            kill = getattr(trainer.strategy.launcher, "kill", None)  # the local launcher's
            if kill is not None:
                kill(signal.SIGKILL)
