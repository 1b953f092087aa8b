"""Resumable sweeps: a job whose results already exist for the same resolved config is skipped.

A finished job leaves `metrics.json` and then, last and atomically, its commit record
`job.json`: ``status: success``, the *fingerprint* of its config (a hash of the resolved config
without the keys that never change a result: paths, loggers, batch size, workers, ...) and
the sha256 of the `metrics.json` and `config_resolved.yaml` it commits. A job is finished only
when that record is there and both files still have those digests (`committed`): a job killed
before its record, or whose files another process rewrote, is unfinished, for resume and for
`cbmir-report` alike. Re-launching a sweep into the same sweep directory finds those records
and returns the stored metrics instead of running again; a job with no record, an error, or
another fingerprint runs. Embeddings are reused through the store either way, so a re-run
costs a search.

Job directories carry the fingerprint in their name (`cbmir.sweeps`), so jobs of different
configs never share one, and a job holds a lock on its directory while it runs
(`hold_job_dir`): a second launch that reaches the same job waits for the first, then finds
its results.

A config names files, it does not pin their contents: the data file, a `model.checkpoint` and
the cached hub weights can be replaced at the same path. `job.json` therefore also records the
version stamp of each input file (size, mtime, ctime, inode: `cbmir.io_utils.file_version`,
which `cp -p` cannot put back), under the path the job named it by, links followed (so a link
re-pointed to other data is a changed input), and a finished job whose inputs changed (or
vanished) since runs again; its store keys hash the new contents, so it embeds afresh rather
than reusing stale embeddings. Weights a re-launch would fetch anew (a hub repository updated
upstream) are not inputs it can see without building the model: such a job is resumed from the
weights it ran with, as recorded in its store entries' manifests.

``resume``: ``auto`` (default) resumes in multirun only, ``true`` also for single runs,
``false`` never.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import cbmir
from cbmir.config import EMBEDDER_TARGET, is_multirun, is_true, numeric_precision
from cbmir.errors import ConfigError
from cbmir.io_utils import release, stat_version, try_lock
from cbmir.retrieval.metric_names import PAPER_METRICS

log = logging.getLogger(__name__)

#: how `job.json` stamps its inputs (`file_stamps`); a record made otherwise is not resumed
INPUT_STAMPS = "as named, links followed"

#: top-level and nested keys left out of the fingerprint: they never change a result
VOLATILE_PATHS: tuple[str, ...] = (
    "paths",
    "logger",
    "hydra",
    "resume",
    "run_name",
    "task_name",
    "cell",
    "data.root",
    "data.real_root",  # where synthetic data must not go; never changes a result
    "data.download",
    "data.batch_size",
    "data.num_workers",
    "retrieval.device",
    "retrieval._target_",  # the class it builds, not a setting (added after results existed)
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
    "model.volume.slice_batch_size",
    "gallery",  # pictures only; metrics do not depend on it
    "channels_last",  # memory format: speed only
)
#: what text-query jobs (`retrieval.query=text`) compute, in their fingerprint: 2 = the
#: configured `retrieval.metrics`, per_query.npz and ci95; jobs finished before (paper metrics
#: whatever the config said, no per-query results) run again
TEXT_RESULTS = 2
#: a job's commit record, written last: status, fingerprint, inputs, digests of RESULT_FILES
RECORD = "job.json"
#: the files a successful record commits (by sha256): the results and the config they are of
RESULT_FILES = ("metrics.json", "config_resolved.yaml")
#: a job's own files that say whether (and how) it finished; the record goes first
MARKERS = (RECORD, "metrics.json", "error.json")
#: held (flock) by the process running the job in this directory
JOB_LOCK = ".cbmir-job.lock"


def fingerprint(cfg: DictConfig | dict[str, Any]) -> str:
    """sha256 of the resolved config without volatile keys, plus the cbmir version."""
    tree = (
        OmegaConf.to_container(cfg, resolve=True)
        if isinstance(cfg, DictConfig)
        else copy.deepcopy(cfg)
    )
    assert isinstance(tree, dict)
    _drop_unused_text_settings(tree)
    _drop_default_embedder(tree)
    for dotted in VOLATILE_PATHS:
        *parents, leaf = dotted.split(".")
        node: Any = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps({"cbmir": cbmir.__version__, "config": tree}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _drop_unused_text_settings(tree: dict[str, Any]) -> None:
    """Image queries never read `retrieval.query`/`prompts`: leave them out of the fingerprint,
    so jobs finished before those keys existed still count as finished."""
    retrieval = tree.get("retrieval")
    if not isinstance(retrieval, dict):
        return
    if retrieval.get("query", "image") == "image":
        retrieval.pop("query", None)
        retrieval.pop("prompts", None)
    else:
        retrieval["text_results"] = TEXT_RESULTS
    # the paper's metric set is what every job computed before `retrieval.metrics` existed
    if list(retrieval.get("metrics", PAPER_METRICS)) == list(PAPER_METRICS):
        retrieval.pop("metrics", None)


def _drop_default_embedder(tree: dict[str, Any]) -> None:
    """The `embedder` node as config.yaml sets it only names the class and mirrors keys that
    are already in the fingerprint (channels_last: speed only; the precision, which
    `check_embedder_config` holds equal to the Trainer's): leave it out, so jobs finished
    before it existed still count as finished. Any other setting or class stays in."""
    node = tree.get("embedder")
    if not isinstance(node, dict) or node.get("_target_") != EMBEDDER_TARGET:
        return
    trainer = tree.get("trainer") if isinstance(tree.get("trainer"), dict) else {}
    if numeric_precision(node.get("precision", "32-true")) == numeric_precision(
        trainer.get("precision", "32-true")
    ):
        node.pop("precision", None)
    node.pop("channels_last", None)
    if set(node) == {"_target_"}:
        del tree["embedder"]


def resume_enabled(cfg: DictConfig) -> bool:
    mode = str(cfg.get("resume", "auto")).lower()
    if is_true(mode):
        return True
    if mode in ("false", "0", "no"):
        return False
    if mode != "auto":
        raise ConfigError(f"resume={mode!r}: use auto, true or false")
    return is_multirun()


def file_stamps(paths: Iterable[str | Path]) -> dict[str, dict[str, int]]:
    """{absolute path as named: its version stamp} of each input file: cheap to compare on a
    re-launch (hashing multi-GB weights to decide whether to skip would cost what skipping
    saves), yet not fooled by a replacement that keeps size and mtime (`stat_version`).

    Each path is kept as the job named it (made absolute, never resolved) and stamped through
    its links: a re-pointed link (`data.path` or a checkpoint that is a symlink) names another
    file, whose stamp differs. Stamping the real path instead would re-check the old target
    and skip the job with the old data's results. No per-path `resolve`: a collection's job
    stamps every image file."""
    stamps = {}
    for path in paths:
        text = os.path.expanduser(os.fspath(path))
        if not os.path.isabs(text):
            text = os.path.join(os.getcwd(), text)
        stamps[text] = _stamp(text)
    return stamps


def _stamp(path: str) -> dict[str, int]:
    return stat_version(os.stat(path))


def changed_inputs(job: dict[str, Any]) -> list[str]:
    """Input files recorded in `job` that are gone or differ from their recorded stamp."""
    changed = []
    for path, stamp in (job.get("inputs") or {}).items():
        try:
            unchanged = _stamp(path) == stamp
        except OSError:
            unchanged = False
        if not unchanged:
            changed.append(path)
    return changed


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def committed(job_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(record, metrics) of a successfully finished job, or None.

    Finished means: `job.json` says success and names the sha256 of every result file, and
    the files on disk still have those digests. What `cbmir-report` and resume both count.
    """
    try:
        record = json.loads((job_dir / RECORD).read_text())
        digests = record.get("files") or {}
        if record.get("status") != "success" or sorted(digests) != sorted(RESULT_FILES):
            return None  # a failure, or a record from before digests (unverifiable)
        if any(sha256_file(job_dir / name) != digest for name, digest in digests.items()):
            return None
        metrics = json.loads((job_dir / "metrics.json").read_text())
    except (OSError, ValueError, AttributeError):
        return None
    return (record, metrics) if isinstance(metrics, dict) else None


def finished_metrics(job_dir: Path, wanted: str) -> dict[str, Any] | None:
    """The stored metrics of `job_dir` if it finished successfully with fingerprint `wanted`
    and its input files are as they were."""
    found = committed(job_dir)
    if found is None:
        return None
    record, metrics = found
    if record.get("fingerprint") != wanted:
        return None
    if record.get("input_stamps") != INPUT_STAMPS:
        log.info("%s: recorded by an older cbmir, which stamped inputs by their real paths "
                 "(blind to a re-pointed link): running again", job_dir.name)  # fmt: skip
        return None
    changed = changed_inputs(record)
    if changed:
        log.info("%s: input changed since it finished (%s): running again",
                 job_dir.name, ", ".join(changed))  # fmt: skip
        return None
    return metrics


def find_finished(cfg: DictConfig) -> dict[str, Any] | None:
    """Stored metrics of a finished job with this config, or None (then the job must run).

    Looks in the job's own directory, then in its siblings (the other jobs of the sweep), so a
    job found under another directory name, e.g. launched with other volatile overrides, is
    not run twice. When the job is to run (nothing found, or resume off), the markers of an
    earlier attempt in its own directory are removed so they cannot be mistaken for this one.
    """
    output_dir = Path(cfg.paths.output_dir)
    if resume_enabled(cfg):
        wanted = fingerprint(cfg)
        candidates = [output_dir]
        if output_dir.parent.is_dir():
            candidates += sorted(p for p in output_dir.parent.iterdir() if p != output_dir)
        for job_dir in candidates:
            metrics = finished_metrics(job_dir, wanted)
            if metrics is not None:
                where = "" if job_dir == output_dir else f" in {job_dir}"
                log.info("%s: skipping, results exist%s (same config)", cfg.get("run_name"), where)
                return metrics
    for name in MARKERS:
        (output_dir / name).unlink(missing_ok=True)
    return None


def job_record(cfg: DictConfig, status: str, inputs: Iterable[str | Path] = ()) -> dict[str, Any]:
    """What `job.json` holds: the status, the run name, the config's fingerprint, the stamps
    of the input files (data file, local weights) the results were computed from and, for a
    success, the sha256 of the result files it commits (read from the job's output dir)."""
    record: dict[str, Any] = {
        "status": status,
        "run_name": cfg.get("run_name"),
        "fingerprint": fingerprint(cfg),
        "inputs": file_stamps(inputs),
        "input_stamps": INPUT_STAMPS,
    }
    if status == "success":
        out = Path(cfg.paths.output_dir)
        record["files"] = {name: sha256_file(out / name) for name in RESULT_FILES}
    return record


@contextlib.contextmanager
def hold_job_dir(job_dir: Path) -> Iterator[None]:
    """Hold `job_dir` for one job: a second process that reaches the same directory (another
    launch into the same sweep) waits here until the first is done, then resumes from its
    record. The lock dies with its process, so a killed run never blocks the next one."""
    job_dir.mkdir(parents=True, exist_ok=True)
    lock = job_dir / JOB_LOCK
    lock.touch()
    fd = try_lock(lock)
    if fd is None:
        log.warning("%s: another live cbmir run is running this job; waiting for it to end",
                    job_dir)  # fmt: skip
    while fd is None:  # cbmir never removes the lock file; retry if someone else did
        lock.touch()
        fd = try_lock(lock, wait=True)
    try:
        yield
    finally:
        release(fd)
