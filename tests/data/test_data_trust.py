"""Data files are trusted by content, never by name, size or mtime; concurrent and killed runs
leave nothing that a later run could trust wrongly (docs/reliability.md, "Data")."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import medmnist
import numpy as np
import pytest
from tests.data.test_npz_files import write_npz
from tests.helpers import compose_config

from cbmir.data import MedMNISTDataModule, files
from cbmir.data.digests import file_digests
from cbmir.data.files import convert_npz_to_npy, load_split_arrays, read_manifest
from cbmir.data.locks import lock_path
from cbmir.data.synthetic import main as synth_main
from cbmir.data.synthetic import write_synthetic_medmnist
from cbmir.errors import DataError

BREAST_MD5 = medmnist.INFO["breastmnist"]["MD5"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _run(tmp: Path, name: str, *overrides: str) -> dict:
    """One real job, in-process (Hydra config, `cli.run_job`, the pipeline), every path under
    `tmp`; returns its metrics.json. A user error exits like the CLI: SystemExit(2)."""
    from cbmir.pipeline import run_retrieval
    from cbmir.runner import run_job

    cfg = compose_config(
        [
            "model=pixels",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "gallery.n_queries=0",
            f"paths.data_root={tmp / 'data'}",
            f"paths.synthetic_root={tmp / 'synthetic'}",
            f"paths.store={tmp / 'store'}",
            f"paths.output_dir={tmp / 'logs' / name}",
            *overrides,
        ]
    )
    run_job(cfg, run_retrieval)
    return json.loads((tmp / "logs" / name / "metrics.json").read_text())


def _replace_keeping_size_and_mtime(path: Path, new: Path) -> None:
    """What `cp -p` / `rsync -a` do to a file: new bytes, same size, the old mtime."""
    old = path.stat()
    assert new.stat().st_size == old.st_size
    shutil.copyfile(new, path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)


# --------------------------------------------------------------------------- checksums


def test_wrong_content_under_a_real_name_is_refused_unless_verify_false(
    make_synthetic, tmp_path, caplog
):
    data = tmp_path / "data"
    data.mkdir()
    fake = data / "breastmnist.npz"  # official names and shapes, other content
    shutil.copy(make_synthetic("breastmnist"), fake)
    args = ["data=breastmnist", "data.download=false"]

    with caplog.at_level(logging.ERROR, logger="cbmir"), pytest.raises(SystemExit) as exit_:
        _run(tmp_path, "refused", *args)
    assert exit_.value.code == 2  # a user error, as the CLI exits
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "\n" not in line and str(fake) in line and _md5(fake) in line and BREAST_MD5 in line
    assert "data.verify=false" in line
    assert not (data / "breastmnist_npy").exists()  # refused before any conversion
    cache = data / ".breastmnist.npz.digests.json"
    hashed_at = cache.stat().st_mtime_ns

    first = _run(tmp_path, "first", *args, "data.verify=false")
    second = _run(tmp_path, "second", *args, "data.verify=false")
    for metrics in (first, second):
        # the config said data.synthetic=false; the file's own marker decides
        assert metrics["synthetic"] is True and metrics["data_verified"] is False
        assert metrics["data_sha256"] == hashlib.sha256(fake.read_bytes()).hexdigest()
    assert second["embedded_now"] == []  # same content: embeddings reused
    assert cache.stat().st_mtime_ns == hashed_at  # verdict cached: hashed once in three runs

    from cbmir.report.collect import collect

    rows = collect(tmp_path / "logs")
    done = rows[rows["status"] == "finished"]
    assert len(done) == 2 and done["synthetic"].all() and (done["data_verified"] == False).all()  # noqa: E712


def test_checksums_are_cached_per_file_version_not_per_size_and_mtime(tmp_path):
    src = write_npz(tmp_path / "own.npz", seed=0)
    cache = tmp_path / "digests.json"
    first = file_digests(src, cache)
    assert first.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert first.md5 == _md5(src)
    written = cache.stat().st_mtime_ns
    assert file_digests(src, cache) == first and cache.stat().st_mtime_ns == written
    _replace_keeping_size_and_mtime(src, write_npz(tmp_path / "other.npz", seed=1))
    second = file_digests(src, cache)
    assert second.sha256 == hashlib.sha256(src.read_bytes()).hexdigest() != first.sha256


def test_content_replaced_with_size_and_mtime_kept_is_reconverted_and_reembedded(tmp_path):
    own = write_npz(tmp_path / "own.npz", n=(30, 5, 12), seed=0)
    first = _run(tmp_path, "first", "data=npz", f"data.path={own}")
    _replace_keeping_size_and_mtime(own, write_npz(tmp_path / "b.npz", n=(30, 5, 12), seed=1))
    second = _run(tmp_path, "second", "data=npz", f"data.path={own}")
    assert sorted(first["embedded_now"]) == sorted(second["embedded_now"]) == ["test", "train"]
    assert second["data_sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()
    assert first["data_sha256"] != second["data_sha256"] and second["data_verified"] is None
    images = load_split_arrays(tmp_path / "own_npy", "train")[0]
    assert np.array_equal(images, np.load(own)["train_images"])  # re-converted


def test_a_run_never_reads_arrays_reconverted_under_it(tmp_path):
    from cbmir.data import NpzDataModule

    own = write_npz(tmp_path / "own.npz", seed=0)
    running = NpzDataModule(own)
    running.setup()  # identity() now names this content
    write_npz(tmp_path / "b.npz", seed=1)
    os.replace(tmp_path / "b.npz", own)
    NpzDataModule(own).setup()  # another run re-converts the new content in place
    with pytest.raises(DataError, match="changed while this run was using it"):
        running.dataset("train")


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_files_never_go_into_a_folder_for_real_ones(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    write_npz(real / "breastmnist.npz")  # not synthetic, under a MedMNIST name
    with pytest.raises(DataError, match="holds breastmnist.npz, which is not a synthetic"):
        write_synthetic_medmnist(real, "pneumoniamnist")
    assert synth_main(["--flags", "pneumoniamnist", "--root", str(real)]) == 2  # cbmir-synth
    assert sorted(p.name for p in real.iterdir()) == ["breastmnist.npz"]
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "medmnist"))
    with pytest.raises(DataError, match="folder for the real MedMNIST files"):
        write_synthetic_medmnist(tmp_path / "medmnist", "breastmnist")
    dm = MedMNISTDataModule(
        "breastmnist", root=tmp_path / "planned", synthetic=True, real_root=tmp_path / "planned"
    )
    with pytest.raises(DataError, match="CBMIR_SYNTHETIC_ROOT"):
        dm.prepare_data()
    assert not list((tmp_path / "medmnist").glob("*.npz")) and not (tmp_path / "planned").exists()
    synth = tmp_path / "synth"  # a folder of synthetic files takes more of them
    write_synthetic_medmnist(synth, "breastmnist")
    write_synthetic_medmnist(synth, "pneumoniamnist")


def test_offline_experiment_refuses_the_real_data_folder(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="cbmir"), pytest.raises(SystemExit) as exit_:
        _run(tmp_path, "refused", "experiment=offline", "paths.synthetic_root=${paths.data_root}")
    assert exit_.value.code == 2 and "Refusing to write synthetic MedMNIST files" in caplog.text
    assert not (tmp_path / "data").exists()


def test_synthetic_stand_in_for_another_dataset_is_refused(make_synthetic, tmp_path):
    shutil.copy(make_synthetic("breastmnist"), tmp_path / "pneumoniamnist.npz")
    with pytest.raises(DataError, match="stand-in for breastmnist at 28 px, not pneumoniamnist"):
        MedMNISTDataModule("pneumoniamnist", root=tmp_path, synthetic=True).prepare_data()


# --------------------------------------------------------------------------- concurrency


def _prepare_in_child(root: str, barrier, results) -> None:
    dm = MedMNISTDataModule("dermamnist", root=root, synthetic=True, download=False)
    barrier.wait(timeout=120)
    try:
        dm.prepare_data()
        results.put(("ok", dm.identity("test")["source_sha256"]))
    except Exception as exc:  # reported to the test, which fails with the message
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def test_concurrent_first_runs_of_a_synthetic_dataset_both_succeed(tmp_path):
    ctx = multiprocessing.get_context("fork")  # cbmir already imported: starts in no time
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_prepare_in_child, args=(str(tmp_path), barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [o[0] for o in outcomes] == ["ok", "ok"], outcomes
    assert outcomes[0][1] == outcomes[1][1]  # both use the one file that was written
    assert read_manifest(tmp_path / "dermamnist_npy")["source"]["sha256"] == outcomes[0][1]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or ".old-" in p.name]


_HOLDER = """
import sys, time
from pathlib import Path
from cbmir.data.locks import exclusive
guarded, leftover = Path(sys.argv[1]), Path(sys.argv[2])
with exclusive(guarded):
    leftover.mkdir() if sys.argv[3] == "dir" else leftover.write_bytes(b"half")
    print("ready", flush=True)
    time.sleep(600)
"""


def _hold_lock(guarded: Path, leftover: Path, kind: str) -> subprocess.Popen:
    """A live writer of `guarded` (another process) with its temporary `leftover`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(guarded), str(leftover), kind],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_killed_conversion_leftovers_are_removed_live_ones_are_not(tmp_path):
    src = write_npz(tmp_path / "own.npz")
    target = tmp_path / "own_npy"
    dead = tmp_path / ".own_npy.tmp-0badc0de"  # what a killed conversion leaves
    dead.mkdir()
    (dead / "train_images.npy").write_bytes(b"half")
    convert_npz_to_npy(src)
    assert not dead.exists() and read_manifest(target)["splits"]["test"]["n"] == 4

    live = tmp_path / ".own_npy.tmp-11ve0001"
    holder = _hold_lock(target, live, "dir")
    done = threading.Event()
    worker = threading.Thread(target=lambda: (convert_npz_to_npy(src), done.set()))
    worker.start()
    try:
        assert not done.wait(1.0)  # waits for the live converter ...
        assert live.is_dir()  # ... and leaves its files alone
    finally:
        holder.send_signal(signal.SIGKILL)  # now it is a killed run's leftover
        holder.wait()
    worker.join(timeout=60)
    assert done.is_set() and not live.exists()


def test_killed_writer_temporaries_beside_data_are_removed_live_ones_are_not(
    make_synthetic, tmp_path
):
    npz = shutil.copy(make_synthetic("breastmnist"), tmp_path / "breastmnist.npz")
    dead = tmp_path / ".breastmnist.npz.0badc0de.tmp"  # a killed cbmir-synth / offline run
    dead.write_bytes(b"half an npz")
    old_part = tmp_path / "breastmnist.npz.part"  # a killed download of older cbmir
    old_part.write_bytes(b"half")
    MedMNISTDataModule("breastmnist", root=tmp_path, synthetic=True).setup()
    assert not dead.exists() and not old_part.exists()

    live = tmp_path / ".breastmnist.npz.11ve0001.part"
    holder = _hold_lock(Path(npz), live, "file")
    try:
        MedMNISTDataModule("breastmnist", root=tmp_path, synthetic=True).setup()  # no wait
        assert live.is_file()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    MedMNISTDataModule("breastmnist", root=tmp_path, synthetic=True).setup()
    assert not live.exists() and lock_path(npz).is_file()


# --------------------------------------------------------------------------- downloads


class _Server:
    """A local HTTP server for one file; `overlap` makes each GET wait until two are in flight."""

    def __init__(self, payload: bytes, overlap: bool = False) -> None:
        self.payload, self.gets = payload, 0
        barrier = threading.Barrier(2, timeout=20) if overlap else None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _head(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()

            def do_HEAD(self) -> None:  # torchvision asks for redirects first
                self._head()

            def do_GET(self) -> None:
                if self.headers.get("Method") == "HEAD":  # torchvision's probe for redirects
                    self._head()
                    return
                server.gets += 1
                if barrier is not None:
                    barrier.wait()
                else:
                    time.sleep(0.5)  # long enough for a concurrent caller to overlap
                self._head()
                self.wfile.write(server.payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/breastmnist.npz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _in_threads(fn, n: int = 2) -> list:
    out: list = [None] * n

    def call(i: int) -> None:
        try:
            out[i] = fn()
        except Exception as exc:  # the assertion below shows it
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_concurrent_downloads_write_distinct_part_files(tmp_path):
    payload = write_npz(tmp_path / "served.npz").read_bytes()
    server = _Server(payload, overlap=True)  # both transfers in flight at once
    target = tmp_path / "data" / "breastmnist.npz"
    target.parent.mkdir()
    try:
        parts = _in_threads(
            lambda: files.download_part(server.url, hashlib.md5(payload).hexdigest(), target)
        )
    finally:
        server.close()
    assert all(isinstance(p, Path) for p in parts), parts
    assert parts[0] != parts[1] and all(p.read_bytes() == payload for p in parts)


def test_concurrent_downloads_of_one_file_download_it_once(tmp_path, monkeypatch):
    payload = write_npz(tmp_path / "served.npz").read_bytes()
    server = _Server(payload)
    monkeypatch.setattr(
        files, "url_and_md5", lambda flag, size: (server.url, hashlib.md5(payload).hexdigest())
    )
    root = tmp_path / "data"
    try:
        got = _in_threads(lambda: files.download_npz("breastmnist", 28, root))
    finally:
        server.close()
    assert got == [root / "breastmnist.npz"] * 2, got
    assert server.gets == 1 and (root / "breastmnist.npz").read_bytes() == payload
    assert sorted(p.name for p in root.iterdir()) == [".breastmnist.npz.lock", "breastmnist.npz"]


def test_report_names_jobs_on_unverified_real_looking_data():
    import pandas as pd

    from cbmir.report.build import _unverified_jobs

    done = pd.DataFrame(
        {
            "job": ["verified", "unverified", "synthetic", "own-npz", "old-job"],
            "synthetic": [False, False, True, False, False],
            "data_verified": [True, False, False, None, np.nan],
        }
    )
    assert _unverified_jobs(done) == ["unverified"]  # synthetic ones have their own note
