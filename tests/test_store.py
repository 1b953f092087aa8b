"""Embedding store: content keys, atomic publication, memory-mapped reads."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbmir.errors import EmbeddingError
from cbmir.store import EmbeddingStore, make_key


def _fill(store: EmbeddingStore, key: str, values: np.ndarray) -> None:
    writer = store.open_writer(key, len(values), values.shape[1], np.arange(len(values)), {})
    writer.write(np.arange(len(values)), values)
    writer.commit()


def test_key_depends_on_every_part() -> None:
    base = make_key(
        {"name": "resnet50", "weights": "a"}, {"flag": "x", "size": 28, "split": "test"}
    )
    assert base == make_key(
        {"weights": "a", "name": "resnet50"}, {"split": "test", "size": 28, "flag": "x"}
    )
    assert base != make_key(
        {"name": "resnet50", "weights": "b"}, {"flag": "x", "size": 28, "split": "test"}
    )
    assert base != make_key(
        {"name": "resnet50", "weights": "a"}, {"flag": "x", "size": 64, "split": "test"}
    )
    assert base != make_key(
        {"name": "resnet50", "weights": "a"}, {"flag": "x", "size": 28, "split": "train"}
    )


def test_round_trip_is_memory_mapped(tmp_path) -> None:
    store = EmbeddingStore(tmp_path)
    values = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    _fill(store, "k1", values)
    entry = store.load("k1")
    assert isinstance(entry.embeddings, np.memmap)
    np.testing.assert_array_equal(entry.embeddings, values)
    np.testing.assert_array_equal(entry.labels, np.arange(10))
    assert entry.manifest["shape"] == [10, 4]


def test_rows_can_arrive_in_any_order(tmp_path) -> None:
    store = EmbeddingStore(tmp_path)
    writer = store.open_writer("k", 4, 2, np.zeros(4), {})
    writer.write(np.array([3, 1]), np.array([[3, 3], [1, 1]]))
    writer.write(np.array([0, 2]), np.array([[0, 0], [2, 2]]))
    writer.commit()
    np.testing.assert_array_equal(store.load("k").embeddings[:, 0], [0, 1, 2, 3])


def test_nan_embeddings_are_an_error_and_leave_nothing(tmp_path) -> None:
    store = EmbeddingStore(tmp_path)
    writer = store.open_writer("bad", 2, 2, np.zeros(2), {})
    with pytest.raises(EmbeddingError, match="NaN or Inf"):
        writer.write(np.array([0, 1]), np.array([[0.0, np.nan], [1.0, 1.0]]))
    writer.abort()
    assert not store.has("bad")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_entry_is_never_published(tmp_path) -> None:
    store = EmbeddingStore(tmp_path)
    writer = store.open_writer("part", 3, 2, np.zeros(3), {})
    writer.write(np.array([0]), np.ones((1, 2)))
    with pytest.raises(EmbeddingError, match="never embedded"):
        writer.commit()
    writer.abort()
    assert not store.has("part")


def test_interrupted_writer_left_on_disk_is_not_trusted(tmp_path) -> None:
    store = EmbeddingStore(tmp_path)
    writer = store.open_writer("crash", 2, 2, np.zeros(2), {})
    writer.write(np.array([0, 1]), np.ones((2, 2)))
    # the process dies here: no commit, no abort
    assert not store.has("crash")
    assert writer.tmp.exists() and writer.tmp.name.startswith(".tmp-")


#: a real writer in another process: opens an entry, says where, then waits for "commit"
_WRITER = """
import sys, numpy as np
from cbmir.store import EmbeddingStore
store = EmbeddingStore(sys.argv[1])
writer = store.open_writer(sys.argv[2], 2, 2, np.zeros(2), {})
writer.write(np.array([0]), np.ones((1, 2)))
print(writer.tmp, flush=True)
if sys.stdin.readline().strip() == "commit":
    writer.write(np.array([1]), np.ones((1, 2)))
    writer.commit()
"""


def _start_writer(store_root, key: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(store_root), key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_stale_temp_of_a_killed_writer_goes_a_live_writers_stays(tmp_path) -> None:
    store = EmbeddingStore(tmp_path)
    killed, killed_tmp = _start_writer(tmp_path, "killed")
    live, live_tmp = _start_writer(tmp_path, "live")
    in_process = store.open_writer("mine", 1, 2, np.zeros(1), {})  # live, in this process
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed_tmp.is_dir()  # what `kill -9` leaves behind
        assert store.remove_stale_temps() == [killed_tmp]
        assert not killed_tmp.exists() and live_tmp.is_dir() and in_process.tmp.is_dir()
        # the live writers finish undisturbed
        live.communicate("commit\n", timeout=60)
        assert live.returncode == 0 and store.has("live")
        in_process.write(np.array([0]), np.ones((1, 2)))
        in_process.commit()
        assert store.has("mine")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["live", "mine"]
    finally:
        for proc in (killed, live):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
