"""One job across many devices (cbmir.distributed): CPU DDP (gloo) through the real `cbmir`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbmir.distributed import ShardWriter, check_launch, is_launch_primary, merge_shards
from cbmir.errors import ConfigError, EmbeddingError
from cbmir.store import EmbeddingStore
from tests import helpers

REPO = Path(__file__).resolve().parents[1]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
#: fields of metrics.json that differ between any two runs (clock time)
TIMINGS = {"embed_seconds", "search_seconds"}


def _npz(path: Path, n_train: int, n_test: int, shape: tuple[int, ...]) -> Path:
    """A collection in the MedMNIST npz layout with odd split sizes (ranks get unequal rows)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 3, (n, 1))
    np.savez(path, **arrays)
    return path


def _run(root: Path, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """`cbmir` with the repository on the path, so every rank can import tests.rank_models."""
    env = helpers.cbmir_env(root)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # the same threads in both runs (Lightning sets it for DDP)
    proc = subprocess.run(
        [sys.executable, "-m", "cbmir.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cbmir failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _outputs(run_dir: Path) -> dict[str, object]:
    """Everything a job published: store entries, neighbours, per-query scores, metrics."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    arrays = {}
    for name in ("neighbors.npz", "per_query.npz"):
        with np.load(run_dir / name) as data:
            arrays.update({f"{name}:{key}": data[key] for key in data.files})
    for field in ("query_entry", "database_entry"):
        entry = Path(metrics[field])
        arrays[f"{field}:embeddings"] = np.load(entry / "embeddings.npy")
        arrays[f"{field}:labels"] = np.load(entry / "labels.npy")
    return {"metrics": {k: v for k, v in metrics.items() if k not in TIMINGS}, **arrays}


def _assert_ddp_equals_one_device(tmp_path: Path, data_args: list[str]) -> None:
    """The same job on one device (in-process, the reference) and on two DDP processes (the
    real `cbmir`, which starts the second rank itself), each into its own store."""
    from cbmir.pipeline import run_retrieval

    one, two = tmp_path / "one", tmp_path / "two"
    args = [*data_args, "model=pixels", "data.batch_size=8", "gallery.n_queries=2"]
    one.mkdir(), two.mkdir()
    run_retrieval(
        helpers.compose_config(
            [*args, f"paths.store={one / 'store'}", f"paths.output_dir={one / 'job'}"]
        )
    )
    _run(two, [*args, f"hydra.run.dir={two / 'job'}", *DDP])
    for root in (one, two):
        assert not list((root / "store").glob(".tmp-*"))
    a, b = _outputs(one / "job"), _outputs(two / "job")
    assert a.keys() == b.keys()
    assert a["metrics"]["embedded_now"] == ["test", "train"]
    for key in a:
        if key == "metrics":
            for field in ("query_entry", "database_entry"):  # same key, another store root
                assert Path(a[key].pop(field)).name == Path(b[key].pop(field)).name
            assert a[key] == b[key]
        else:  # bit-equal
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    # rank 1 wrote no outputs of its own and left no lock waiting (the job finished)
    assert json.loads((two / "job" / "job.json").read_text())["status"] == "success"


def test_ddp_on_two_cpu_processes_equals_one_device_2d(tmp_path: Path) -> None:
    data = _npz(tmp_path / "tiny2d.npz", n_train=67, n_test=41, shape=(28, 28))
    _assert_ddp_equals_one_device(tmp_path, ["data=npz", f"data.path={data}"])


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_device_3d(tmp_path: Path) -> None:
    data = _npz(tmp_path / "tiny3d.npz", n_train=15, n_test=9, shape=(28, 28, 28))
    _assert_ddp_equals_one_device(tmp_path, ["data=npz", f"data.path={data}", "data.volumes=true"])


@pytest.mark.slow
def test_a_failing_rank_leaves_no_entry_and_no_temporary(tmp_path: Path) -> None:
    data = _npz(tmp_path / "tiny2d.npz", n_train=67, n_test=41, shape=(28, 28))
    args = ["data=npz", f"data.path={data}", "model=pixels", "data.batch_size=8", *DDP,
            "model._target_=tests.rank_models.FailsOnRankOne"]  # fmt: skip
    proc = _run(tmp_path, args, check=False)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stdout + proc.stderr
    assert list((tmp_path / "store").iterdir()) == []  # nothing published, no temporary
    assert not list((tmp_path / "logs").rglob("metrics.json"))


def test_launch_primary_is_global_rank_zero_before_any_trainer() -> None:
    assert is_launch_primary({})
    assert not is_launch_primary({"LOCAL_RANK": "1", "NODE_RANK": "0"})  # Lightning's child
    assert not is_launch_primary({"LOCAL_RANK": "0", "NODE_RANK": "1"})  # another node
    assert not is_launch_primary({"RANK": "3", "LOCAL_RANK": "0"})  # torchrun
    # one SLURM task: the launcher's children inherit SLURM_PROCID=0
    assert is_launch_primary({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert not is_launch_primary({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "LOCAL_RANK": "1"})
    assert not is_launch_primary({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"})  # srun
    assert is_launch_primary({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"})


def test_ddp_in_a_multirun_is_refused_before_any_work() -> None:
    for trainer in ({"devices": 2}, {"devices": "auto"}, {"devices": [0, 1]}, {"num_nodes": 2}):
        with pytest.raises(ConfigError, match="one job per device"):
            check_launch(trainer, multirun=True)
        check_launch(trainer, multirun=False)
    check_launch({"devices": 1}, multirun=True)
    check_launch({"devices": [3]}, multirun=True)


def _entry_with_shards(tmp_path: Path, shards: list[list[int]]):
    store = EmbeddingStore(tmp_path / "store")
    n = 5
    writer = store.open_writer("k" * 32, n, 2, np.zeros(n, dtype=np.int64), {})
    for rank, rows in enumerate(shards):
        shard = ShardWriter(writer.tmp, rank, 2)
        rows_array = np.asarray(rows, dtype=np.int64)
        shard.write(rows_array, np.stack([rows_array, -rows_array], axis=1).astype(np.float32))
        shard.close()
    return store, writer


def test_merged_shards_put_each_row_at_its_dataset_index(tmp_path: Path) -> None:
    store, writer = _entry_with_shards(tmp_path, [[0, 2, 4], [1, 3]])  # unequal shares
    merge_shards(writer, n_ranks=2)
    writer.commit()
    embeddings = store.load("k" * 32).embeddings
    np.testing.assert_array_equal(embeddings[:, 0], np.arange(5))
    np.testing.assert_array_equal(embeddings[:, 1], -np.arange(5))
    assert not list(store.entry_dir("k" * 32).glob("shard-*"))


@pytest.mark.parametrize(
    ("shards", "problem"),
    [([[0, 2, 4], [1]], "1 rows never embedded"), ([[0, 2, 4], [1, 3, 4]], "1 embedded more")],
)
def test_a_row_missing_or_written_twice_across_ranks_is_refused(
    tmp_path: Path, shards: list[list[int]], problem: str
) -> None:
    _, writer = _entry_with_shards(tmp_path, shards)
    with pytest.raises(EmbeddingError, match=problem):
        merge_shards(writer, n_ranks=2)
    writer.abort()
