"""Several launches into one sweep directory (real `cbmir -m` subprocesses): jobs of different
grids never share a job directory or hand back each other's metrics, and a launch that reaches
a job another live launch is running waits for it, then resumes from its results."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from cbmir.resume import committed, fingerprint
from cbmir.sweeps import FINGERPRINT_CHARS
from tests.helpers import cbmir_command, cbmir_env, run_cbmir

BASE = ["experiment=offline", "model=pixels", "gallery.n_queries=0"]


def _finished_jobs(sweep: Path) -> dict[str, dict]:
    """{job dir name: committed metrics} of the sweep."""
    found = {}
    for job in sorted(p.parent for p in sweep.glob("*/job.json")):
        done = committed(job)
        if done is not None:
            found[job.name] = done[1]
    return found


def _output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_two_grids_in_one_sweep_dir_keep_their_own_results(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    grid_a = ["-m", *BASE, "retrieval.k=3,5", f"hydra.sweep.dir={sweep}"]
    # grid B differs from A only in keys that are not in the job names (experiment=offline
    # vs its two settings spelled out; the retrieval preset vs its distance)
    grid_b = ["-m", "model=pixels", "gallery.n_queries=0", "data.synthetic=true",
              "model.pretrained=false", "retrieval.k=3", "retrieval.distance=euclidean,cosine",
              f"hydra.sweep.dir={sweep}"]  # fmt: skip
    run_cbmir(grid_a, tmp_path)
    run_cbmir(grid_b, tmp_path)
    again = run_cbmir(grid_a, tmp_path)

    # A's relaunch finds both its jobs; B's k=3 euclidean job is A's k=3 job (same config)
    assert _output(again).count("skipping, results exist") == 2
    assert "job finished" not in _output(again)
    jobs = _finished_jobs(sweep)
    assert len(jobs) == 3
    seen = set()
    for name, metrics in jobs.items():
        cfg = OmegaConf.load(sweep / name / "config_resolved.yaml")
        # each directory's metrics are those of the config it holds, named by its fingerprint
        assert (metrics["k"], metrics["distance"]) == (cfg.retrieval.k, cfg.retrieval.distance)
        assert name.endswith("-" + fingerprint(cfg)[:FINGERPRINT_CHARS])
        seen.add((metrics["k"], metrics["distance"]))
    assert seen == {(3, "euclidean"), (5, "euclidean"), (3, "cosine")}


def _read_lines(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_live_launch_waits_for_the_job_then_resumes_from_it(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *BASE, "data.batch_size=1", f"hydra.sweep.dir={sweep}"]
    env = cbmir_env(tmp_path)
    popen = {"env": env, "cwd": tmp_path, "text": True, "stdout": subprocess.PIPE,
             "stderr": subprocess.STDOUT}  # fmt: skip
    first = subprocess.Popen(cbmir_command(args), **popen)
    second = None
    first_lines: list[str] = []
    _read_lines(first, first_lines)
    try:
        # the first launch is inside its job (config written, no commit record yet): pause it
        _wait_for(lambda: list(sweep.glob("*/config_resolved.yaml")), first, "the first job")
        first.send_signal(signal.SIGSTOP)
        (job,) = [p.parent for p in sweep.glob("*/config_resolved.yaml")]
        assert not (job / "job.json").exists(), "the first launch finished before the pause"

        second = subprocess.Popen(cbmir_command(args), **popen)
        second_lines: list[str] = []
        reader = _read_lines(second, second_lines)
        _wait_for(lambda: "waiting for it to end" in "".join(second_lines), second, "a wait")
        assert not (job / "job.json").exists()  # the second launch did not run the job
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
        reader.join(timeout=10)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    second_text = "".join(second_lines)
    assert "skipping, results exist" in second_text and "job finished" not in second_text
    assert "job finished" in "".join(first_lines)
    (metrics,) = _finished_jobs(sweep).values()
    assert metrics == json.loads((job / "metrics.json").read_text())
