"""A run killed with `kill -9` while embedding: what it finished is kept, what it left half
written is cleaned up, and the next run does only the rest (real `cbmir` subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import cbmir_command, cbmir_env, run_cbmir

#: raw pixels on synthetic BreastMNIST (156 queries, 546 database images)
JOB = ["experiment=offline", "model=pixels", "gallery.n_queries=0"]
#: one image per batch: the database split takes seconds, time to kill the run inside it
SLOW = [*JOB, "data.batch_size=1", "data.num_workers=0", "trainer.enable_progress_bar=false"]


def _published(store: Path) -> dict[str, Path]:
    """{split: entry dir} of the finished store entries."""
    found = {}
    for manifest in store.glob("[!.]*/manifest.json"):
        found[json.loads(manifest.read_text())["data"]["split"]] = manifest.parent
    return found


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """`kill -9` the process as soon as `ready()` holds (it must, before the process ends)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the moment to kill it"
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def test_kill_during_the_database_split_keeps_the_query_split(tmp_path) -> None:
    store = tmp_path / "store"
    proc = subprocess.Popen(
        cbmir_command(SLOW),
        env=cbmir_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _kill_when(proc, lambda: "test" in _published(store))
    assert proc.returncode == -signal.SIGKILL
    published = _published(store)
    assert list(published) == ["test"]  # the query split survived the crash
    query_manifest = (published["test"] / "manifest.json").read_text()
    (stale,) = store.glob(".tmp-*")  # the database split, half written
    assert (stale / "embeddings.npy").is_file()

    run_cbmir(JOB, tmp_path)  # batch size is speed only: same store keys
    (metrics_path,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["embedded_now"] == ["train"]  # only the database split was embedded
    assert (metrics["n_queries"], metrics["n_database"]) == (156, 546)
    assert sorted(_published(store)) == ["test", "train"]
    assert (published["test"] / "manifest.json").read_text() == query_manifest
    assert not list(store.glob(".tmp-*"))  # the killed run's temporary is gone
