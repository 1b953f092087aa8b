"""Resume: stable job directories and config fingerprints decide what a re-launch skips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cbmir.errors import ConfigError
from cbmir.io_utils import write_json
from cbmir.resume import find_finished, fingerprint, job_record
from cbmir.sweeps import cell_part, job_subdir, parse_cell
from tests.helpers import compose_config


def test_job_subdir_is_the_run_name_plus_result_changing_overrides() -> None:
    base = ["experiment=paper", "model=vgg19", "cell=breastmnist@28"]
    assert job_subdir("vgg19-breastmnist-28", base) == "vgg19-breastmnist-28"
    volatile = ["paths.store=/a/b", "logger=wandb", "data.batch_size=8", "hydra.launcher.qos=x"]
    assert job_subdir("vgg19-breastmnist-28", base + volatile) == "vgg19-breastmnist-28"
    extra = ["retrieval=cosine", "+model.checkpoint=/ckpt/best.ckpt"]
    name = job_subdir("vgg19-breastmnist-28", base + extra)
    assert name == "vgg19-breastmnist-28__model.checkpoint=_ckpt_best.ckpt,retrieval=cosine"
    assert name == job_subdir("vgg19-breastmnist-28", list(reversed(base + extra)))
    long = job_subdir("vgg19-breastmnist-28", [f"model.model_kwargs.k{i}=1" for i in range(40)])
    assert "/" not in long and len(long) < 60 and long.startswith("vgg19-breastmnist-28__")


def test_cells_parse_or_say_how_to_write_them() -> None:
    assert parse_cell("BreastMNIST@64") == ("breastmnist", 64)
    assert cell_part("adrenalmnist3d@28", "size") == 28
    for bad in ("breastmnist", "breastmnist@", "@28", "breastmnist@big"):
        with pytest.raises(ConfigError, match="DATASET@SIZE"):
            parse_cell(bad)


def _cfg(output_dir: Path, *overrides: str):
    return compose_config(
        [f"paths.output_dir={output_dir}", "model=pixels", "resume=true", *overrides]
    )


def test_fingerprint_ignores_where_and_how_but_not_what(tmp_path) -> None:
    base = fingerprint(_cfg(tmp_path / "a"))
    assert fingerprint(_cfg(tmp_path / "b", "data.batch_size=7", "logger=none")) == base
    assert fingerprint(_cfg(tmp_path / "a", f"paths.store={tmp_path}", "resume=false")) == base
    for change in ("retrieval=cosine", "data.size=64", "model.name=other", "seed=1"):
        assert fingerprint(_cfg(tmp_path / "a", change)) != base, change


def _write_results(cfg, metrics: dict) -> None:
    """The result files a job writes before its commit record."""
    out = Path(cfg.paths.output_dir)
    write_json(out / "metrics.json", metrics)
    (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _finish(cfg, metrics: dict, inputs: tuple = ()) -> None:
    _write_results(cfg, metrics)
    write_json(Path(cfg.paths.output_dir) / "job.json", job_record(cfg, "success", [*inputs]))


def test_the_retrieval_target_leaves_fingerprints_as_they_were(tmp_path) -> None:
    """`retrieval._target_` names the class the config builds, not a setting: jobs finished
    before it was added keep their fingerprint (and sweep directory)."""
    cfg = _cfg(tmp_path)
    assert OmegaConf.select(cfg, "retrieval._target_")
    before = OmegaConf.create(OmegaConf.to_container(cfg))
    del before.retrieval["_target_"]
    assert fingerprint(cfg) == fingerprint(before)


def test_the_embedder_node_leaves_fingerprints_as_they_were(tmp_path) -> None:
    """`embedder` names the class and mirrors keys already in the fingerprint: jobs finished
    before it was added keep their fingerprint; another class or setting is a new job."""
    cfg = _cfg(tmp_path)
    assert OmegaConf.select(cfg, "embedder._target_") == "cbmir.embedding.FrozenEmbedder"
    before = OmegaConf.create(OmegaConf.to_container(cfg))
    del before["embedder"]
    assert fingerprint(cfg) == fingerprint(before)
    bf16 = _cfg(tmp_path, "trainer.precision=bf16-mixed")
    assert fingerprint(bf16) != fingerprint(cfg)
    assert OmegaConf.select(bf16, "embedder.precision") == "bf16-mixed"
    for change in ("embedder._target_=tests.test_embedding.Doubled", "+embedder.x=1"):
        assert fingerprint(_cfg(tmp_path, change)) != fingerprint(cfg), change


def test_find_finished_returns_stored_metrics_of_the_same_config(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    done = _cfg(sweep / "job-a")
    _finish(done, {"acc@1": 0.25})
    assert find_finished(_cfg(sweep / "job-a")) == {"acc@1": 0.25}
    # the same job under another directory name (e.g. launched with other volatile overrides)
    assert find_finished(_cfg(sweep / "job-b", "data.num_workers=3")) == {"acc@1": 0.25}
    # resume off: runs
    assert find_finished(_cfg(sweep / "job-a", "resume=false")) is None


def test_find_finished_runs_a_changed_failed_or_partial_job_and_clears_its_markers(
    tmp_path,
) -> None:
    job = tmp_path / "sweep" / "job"
    _finish(_cfg(job), {"acc@1": 0.25})
    assert find_finished(_cfg(job, "retrieval=cosine")) is None
    assert not (job / "metrics.json").exists() and not (job / "job.json").exists()

    cfg = _cfg(job)
    write_json(job / "metrics.json", {"acc@1": 0.5})
    write_json(job / "job.json", job_record(cfg, "failed"))
    write_json(job / "error.json", {"error": "boom"})
    assert find_finished(cfg) is None
    assert not list(job.glob("*.json"))

    _finish(cfg, {"acc@1": 0.5})
    (job / "metrics.json").unlink()  # results deleted by hand: the job runs again
    assert find_finished(cfg) is None


def test_resume_modes(tmp_path) -> None:
    job = tmp_path / "job"
    cfg = _cfg(job)
    _finish(cfg, {"acc@1": 0.5})
    # auto resumes in multirun only; this is a plain (non-Hydra) call
    assert find_finished(_cfg(job, "resume=auto")) is None
    _finish(cfg, {"acc@1": 0.5})
    with pytest.raises(ConfigError, match="auto, true or false"):
        find_finished(_cfg(job, "resume=sometimes"))
    assert json.loads((job / "metrics.json").read_text()) == {"acc@1": 0.5}


def test_a_replaced_or_vanished_input_file_reruns_a_finished_job(tmp_path) -> None:
    data = tmp_path / "mine.npz"
    data.write_bytes(b"first contents")
    job = tmp_path / "sweep" / "job"
    cfg = _cfg(job)
    _finish(cfg, {"acc@1": 0.5}, (data,))
    assert find_finished(cfg) == {"acc@1": 0.5}

    stamp = data.stat()
    data.write_bytes(b"other contents")  # same size, same path: only the mtime tells
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert find_finished(cfg) is None

    _finish(cfg, {"acc@1": 0.5}, (data,))
    data.unlink()
    assert find_finished(cfg) is None


def test_an_input_replaced_with_its_size_and_mtime_kept_reruns_the_job(tmp_path) -> None:
    """`cp -p` / `rsync -a` put size and mtime back: the stamp must still tell."""
    data = tmp_path / "mine.npz"
    data.write_bytes(b"first contents")
    job = tmp_path / "sweep" / "job"
    cfg = _cfg(job)
    _finish(cfg, {"acc@1": 0.5}, (data,))
    before = data.stat()
    replacement = tmp_path / "other.npz"
    replacement.write_bytes(b"other contents")  # same size
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, data)
    after = data.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert find_finished(cfg) is None


def test_a_re_pointed_link_reruns_a_finished_job(tmp_path) -> None:
    """An input named through a link (`data.path`, a `latest.ckpt`) is stamped through it, under
    the name the job used: re-pointed to other data, it is a changed input. Stamped by its real
    path, the old target was re-checked, found unchanged, and the job skipped with the old
    data's metrics."""
    for name in ("a.npz", "b.npz"):
        (tmp_path / name).write_bytes(b"same bytes, other file")
    link = tmp_path / "current.npz"
    link.symlink_to(tmp_path / "a.npz")
    job = tmp_path / "sweep" / "job"
    cfg = _cfg(job)
    _finish(cfg, {"acc@1": 0.5}, (link,))
    assert list(json.loads((job / "job.json").read_text())["inputs"]) == [str(link)]
    assert find_finished(cfg) == {"acc@1": 0.5}
    link.unlink()
    link.symlink_to(tmp_path / "b.npz")
    assert find_finished(cfg) is None


def test_a_record_of_inputs_stamped_by_real_path_is_not_resumed(tmp_path) -> None:
    """Records written before inputs were stamped as named cannot tell a re-pointed link: such
    a job runs once more (its embeddings come from the store)."""
    data = tmp_path / "mine.npz"
    data.write_bytes(b"contents")
    job = tmp_path / "sweep" / "job"
    cfg = _cfg(job)
    _finish(cfg, {"acc@1": 0.5}, (data,))
    record = json.loads((job / "job.json").read_text())
    assert find_finished(cfg) == {"acc@1": 0.5}
    del record["input_stamps"]
    write_json(job / "job.json", record)
    assert find_finished(cfg) is None


def test_weights_files_identified_while_building_are_recorded(tmp_path) -> None:
    """What the pipeline records as a job's weights inputs: every file hashed for an identity."""
    from cbmir.extractors import weights_file
    from cbmir.extractors.checkpoint import weights_identity

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not really weights, but a file to identify")
    with weights_file.recording() as files:
        weights_identity(weights)
        weights_identity(weights)
    assert files == [weights.absolute()]
    weights_identity(weights)  # outside the block: nothing more is recorded
    assert files == [weights.absolute()]
    latest = tmp_path / "latest.safetensors"  # a link: recorded as named, not as its target
    latest.symlink_to(weights)
    with weights_file.recording() as files:
        weights_identity(latest)
    assert files == [latest.absolute()]


@pytest.fixture
def real_job(tmp_path, synthetic_root) -> tuple[Path, object]:
    """One job run by the pipeline (raw pixels, synthetic BreastMNIST): its dir and config."""
    from cbmir.pipeline import run_retrieval

    cfg = _cfg(
        tmp_path / "sweep" / "job",
        "data.synthetic=true",
        "data.download=false",
        f"paths.synthetic_root={synthetic_root}",
        f"paths.store={tmp_path / 'store'}",
        "gallery.n_queries=0",
    )
    run_retrieval(cfg)
    return Path(cfg.paths.output_dir), cfg


def _report_status(job: Path) -> str:
    from cbmir.report.collect import collect

    return collect(job.parent).set_index("job").loc[job.name, "status"]


def test_resume_and_report_agree_a_job_is_finished_only_when_its_record_vouches_for_it(
    real_job,
) -> None:
    job, cfg = real_job
    metrics = json.loads((job / "metrics.json").read_text())
    assert find_finished(cfg) == metrics and _report_status(job) == "finished"
    record = (job / "job.json").read_text()

    # killed between metrics.json and job.json: unfinished for both
    (job / "job.json").unlink()
    assert _report_status(job) == "incomplete"
    assert find_finished(cfg) is None and not (job / "metrics.json").exists()

    # metrics.json rewritten by another process after the record: not this record's results
    (job / "job.json").write_text(record)
    write_json(job / "metrics.json", {**metrics, "acc@1": 1.0})
    assert _report_status(job) == "incomplete"
    assert find_finished(cfg) is None

    # a record from before digests: nothing ties it to its files, so it is not trusted either
    write_json(job / "metrics.json", metrics)
    legacy = {k: v for k, v in json.loads(record).items() if k != "files"}
    write_json(job / "job.json", legacy)
    assert _report_status(job) == "incomplete"
    assert find_finished(cfg) is None
