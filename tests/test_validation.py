"""Every setting of a retrieval job is checked before data, weights or embedding (issue 18).

In-process tests run the real Hydra configs through `cbmir.validation`; the end-to-end tests
(one `cbmir` subprocess each) prove the exit code, the single line and the empty store.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cbmir.errors import ConfigError, DataError
from cbmir.retrieval.settings import RetrievalSettings
from cbmir.schema import typed
from cbmir.validation import (
    COMMON_PRECISIONS,
    JobSchema,
    check_config,
    check_data,
    check_data_source,
    lightning_precisions,
    ranking_is_irrelevant,
    writable_dir,
)
from cbmir.volumes import VolumeSpec
from tests import helpers

OFFLINE = ["experiment=offline", "model=pixels"]


@pytest.fixture
def make_readonly():
    """`make_readonly(folder)`: no new file can be created in it, also for root (chattr +i)."""
    frozen: list[Path] = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            path.chmod(0o555)
        elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("root without chattr +i here: no read-only folder to test with")
        frozen.append(path)
        return path

    yield make
    for path in frozen:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("retrieval.distance=manhattan", "retrieval.distance 'manhattan'; choose one of euclidean"),
        ("retrieval.k=0", "retrieval.k must be a positive integer, got 0"),
        ("retrieval.k=-3", "retrieval.k must be a positive integer, got -3"),
        ("retrieval.k=abc", "retrieval.k must be an integer, got 'abc'"),
        ("retrieval.k=2.5", "retrieval.k must be an integer, got 2.5"),
        ("retrieval.backend=annoy", "backend 'annoy'; choose one of torch, faiss"),
        ("retrieval.acc_ks=[1,10]", "acc@10 but only k=5 neighbours"),
        ("retrieval.acc_ks=[0,1]", "acc_ks entry must be a positive integer, got 0"),
        ("retrieval.acc_ks=3", "retrieval.acc_ks must be a list"),
        ("retrieval.device=tpu", "retrieval.device='tpu'; choose one of auto, cpu, cuda"),
        ("+retrieval.search.db_chunk=0", "retrieval.search.db_chunk must be a positive integer"),
        ("+retrieval.search.chunks=4", "unknown key retrieval.search.chunks; allowed: query"),
        ("+retrieval.kk=3", "unknown key retrieval.kk; allowed: _target_, k, distance"),
        ("+retrieval.search.score_dtype=float8", "score_dtype must be float16, bfloat16"),
        ("+retrieval.search.rerank=maybe", "retrieval.search.rerank must be true or false"),
        ("retrieval.faiss.kind=lsh", "faiss index kind 'lsh'; choose one of flat, ivf, hnsw"),
        ("+retrieval.faiss.params.nlist=16", "unknown flat index parameters ['nlist']"),
        ("trainer.precision=banana", "trainer.precision='banana' is not a precision; choose"),
        ("trainer.accelerator=quantum", "trainer.accelerator='quantum'; choose one of auto, gpu"),
        ("seed=abc", "seed must be an integer, got 'abc'"),
        ("seed=1.5", "seed must be an integer, got 1.5"),
        ("resume=maybe", "use auto, true or false"),
        ("data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
        ("data.num_workers=-1", "data.num_workers must be an integer >= 0, got -1"),
        ("gallery.n_queries=-1", "gallery.n_queries (0: no gallery) must be an integer >= 0"),
        ("gallery.n_queries=many", "gallery.n_queries must be an integer or null, got 'many'"),
        ("channels_last=sometimes", "use true, false or auto"),
        ("embedder.channels_last=sometimes", "use true, false or auto"),
        ("embedder.precision=bf16-mixed", "embedder.precision='bf16-mixed' differs from trainer"),
        ("model.volume.reduce=median", "unknown model.volume.reduce 'median'; choose one of"),
    ],
)
def test_every_bad_setting_is_named_before_any_work(override, message) -> None:
    cfg = helpers.compose_config([*OFFLINE, override])
    with pytest.raises(ConfigError) as raised:
        check_config(cfg)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)  # one line


def test_faiss_settings_are_checked_when_faiss_is_the_backend() -> None:
    pytest.importorskip("faiss")
    base = [*OFFLINE, "retrieval.backend=faiss", "retrieval.faiss.kind=ivf"]
    for override, message in (
        ("+retrieval.faiss.params.nlist=0", "faiss nlist must be a positive integer, got 0"),
        ("+retrieval.faiss.params.seed=-1", "faiss seed must be an integer >= 0"),
        ("+retrieval.faiss.params.M=8", "unknown ivf index parameters ['M']"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_config(helpers.compose_config([*base, override]))


def test_cuda_settings_need_a_cuda_device() -> None:
    import torch

    for override, key in (
        ("retrieval.device=cuda", "retrieval.device=cuda"),
        ("trainer=gpu", "trainer.accelerator=gpu"),
    ):
        cfg = helpers.compose_config([*OFFLINE, override])
        if torch.cuda.is_available():
            check_config(cfg)  # valid on this machine
            continue
        with pytest.raises(ConfigError, match=re.escape(key) + " but"):
            check_config(cfg)


def test_default_acc_ks_follow_k() -> None:
    """The default ACC@k cut-offs are the paper's up to k: a k sweep validates as it is."""
    for k, expected in ((5, (1, 3, 5)), (3, (1, 3)), (1, (1,)), (10, (1, 3, 5))):
        settings = check_config(helpers.compose_config([f"retrieval.k={k}"]))
        assert settings.acc_ks == expected, (k, settings.acc_ks)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["retrieval=cosine", "trainer.precision=bf16-mixed"],
        ["trainer.precision=16", "retrieval.k=1", "retrieval.acc_ks=[1]"],
        ["retrieval.backend=faiss", "retrieval.faiss.kind=hnsw", "+retrieval.faiss.params.M=8"],
        ["+retrieval.search.score_dtype=bfloat16", "+retrieval.search.db_chunk=64"],
        ["gallery.n_queries=0", "seed=7", "resume=true", "data.num_workers=0"],
    ],
)
def test_valid_settings_pass(overrides) -> None:
    if "retrieval.backend=faiss" in overrides:
        pytest.importorskip("faiss")
    settings = check_config(helpers.compose_config([*OFFLINE, *overrides]))
    if "retrieval.k=1" in overrides:
        assert (settings.k, settings.acc_ks) == (1, (1,))
    if "+retrieval.search.score_dtype=bfloat16" in overrides:
        import torch

        assert settings.search.kwargs() == {"score_dtype": torch.bfloat16, "db_chunk": 64}


def test_a_store_path_that_is_a_file_or_read_only_is_one_line(tmp_path, make_readonly) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    readonly = make_readonly(tmp_path / "ro")
    for path in (afile, afile / "store", readonly, readonly / "store"):
        with pytest.raises(ConfigError, match=r"paths.store=.* is not a writable directory \("):
            writable_dir(path, "paths.store", "set paths.store=DIR")
    assert list(readonly.iterdir()) == []  # the probe left nothing behind
    assert writable_dir(tmp_path / "new" / "store", "paths.store", "") == tmp_path / "new" / "store"
    assert list((tmp_path / "new" / "store").iterdir()) == []


def _npz_with_labels(path: Path, train_labels: np.ndarray, test_labels: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, labels in (("train", train_labels), ("test", test_labels)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64).reshape(len(labels), -1)
    np.savez(path, **arrays)
    return path


def _datamodule(overrides: list[str]):
    cfg = helpers.compose_config(overrides)
    settings = check_config(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("predict")
    return settings, datamodule


def test_a_one_class_database_is_an_error_before_embedding(tmp_path) -> None:
    npz = _npz_with_labels(tmp_path / "one.npz", np.zeros(30), np.array([0, 1] * 5))
    settings, datamodule = _datamodule([*OFFLINE, "data=npz", f"data.path={npz}"])
    with pytest.raises(DataError, match="1 distinct label.*would not depend on the model"):
        check_data(settings, datamodule)
    two = _npz_with_labels(tmp_path / "two.npz", np.array([0, 1] * 15), np.array([0, 1] * 5))
    settings, datamodule = _datamodule([*OFFLINE, "data=npz", f"data.path={two}"])
    check_data(settings, datamodule)  # two classes: fine


def test_k_beyond_the_database_split_is_an_error_before_embedding(synthetic_root) -> None:
    base = [*OFFLINE, f"paths.synthetic_root={synthetic_root}"]
    settings, datamodule = _datamodule([*base, "retrieval.k=547", "retrieval.acc_ks=[1]"])
    with pytest.raises(ConfigError, match="retrieval.k=547 exceeds the 546 database rows"):
        check_data(settings, datamodule)
    settings, datamodule = _datamodule([*base, "retrieval.k=546", "retrieval.acc_ks=[1]"])
    check_data(settings, datamodule)


@pytest.mark.parametrize(
    ("queries", "database", "multilabel", "irrelevant"),
    [
        ([0, 1, 2], [1, 1, 1], False, True),  # one class in the database
        ([3, 4], [0, 1, 2], False, True),  # no query class in the database: all irrelevant
        ([0, 3], [0, 1, 2], False, False),
        ([[1, 0, 0], [0, 0, 0]], [[1, 1, 0], [1, 0, 1]], True, True),  # all hit / none hit
        ([[1, 0, 0]], [[1, 1, 0], [1, 0, 1]], True, True),  # every item shares label 0
        ([[0, 1, 0]], [[1, 1, 0], [1, 0, 1]], True, False),
    ],
)
def test_ranking_is_irrelevant(queries, database, multilabel, irrelevant) -> None:
    q, d = np.asarray(queries), np.asarray(database)
    assert ranking_is_irrelevant(q, d, multilabel) is irrelevant


def test_read_only_data_folder_hint_is_an_override_hydra_accepts(tmp_path, make_readonly):
    from cbmir.data.synthetic import write_synthetic_medmnist

    root = tmp_path / "data"
    write_synthetic_medmnist(root, "breastmnist", 28, seed=0)
    make_readonly(root)
    # a synthetic stand-in under the real name: accepted only with verify off (tests/data)
    base = ["model=pixels", f"data.root={root}", "data.download=false", "data.verify=false"]
    cfg = helpers.compose_config(base)
    with pytest.raises(DataError) as raised:
        instantiate(cfg.data).prepare_data()
    hint = re.search(r"(\S+)=DIR", str(raised.value))
    assert hint is not None, str(raised.value)
    override = f"{hint.group(1)}={tmp_path / 'npy'}"  # the hint, as a user would type it
    datamodule = instantiate(helpers.compose_config([*base, override]).data)
    datamodule.prepare_data()
    assert len(datamodule.labels("train")) == 546
    visible = [p for p in (tmp_path / "npy").iterdir() if not p.name.startswith(".")]
    assert visible == [tmp_path / "npy" / "breastmnist_npy"]  # (+ its lock and checksum cache)


def test_read_only_synthetic_root_is_one_line(tmp_path, make_readonly) -> None:
    root = make_readonly(tmp_path / "synthetic")
    cfg = helpers.compose_config([*OFFLINE, f"paths.synthetic_root={root}"])
    with pytest.raises(DataError, match="paths.synthetic_root=DIR"):
        instantiate(cfg.data).prepare_data()


# ------------------------------------------------------------------ end to end (subprocesses)
def _store_entries(root: Path) -> list[Path]:
    store = root / "store"
    return list(store.iterdir()) if store.is_dir() else []


def _assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if message in line]
    assert errors, text


def test_bad_retrieval_setting_fails_before_embedding_end_to_end(tmp_path) -> None:
    proc = helpers.run_cbmir([*OFFLINE, "retrieval.distance=manhattan"], tmp_path, check=False)
    assert proc.returncode == 2
    _assert_one_line_error(proc, "retrieval.distance 'manhattan'; choose one of euclidean, cosine")
    assert _store_entries(tmp_path) == []  # nothing was embedded


def test_multirun_bad_k_values_each_fail_in_one_line_without_embedding(tmp_path) -> None:
    args = ["-m", *OFFLINE, "retrieval.acc_ks=[1]", "retrieval.k=abc,0,100000"]
    proc = helpers.run_cbmir(args, tmp_path, check=False)
    assert proc.returncode == 1  # a multirun goes on past failed jobs, then says so
    _assert_one_line_error(proc, "retrieval.k must be an integer, got 'abc'")
    _assert_one_line_error(proc, "retrieval.k must be a positive integer, got 0")
    _assert_one_line_error(proc, "retrieval.k=100000 exceeds the 546 database rows")
    assert "3 job(s) failed" in proc.stderr
    assert _store_entries(tmp_path) == []


def test_unwritable_store_and_output_dir_are_one_line(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = helpers.run_cbmir([*OFFLINE, f"paths.store={afile}"], tmp_path, check=False)
    assert proc.returncode == 2
    _assert_one_line_error(proc, f"paths.store={afile} is not a writable directory")
    proc = helpers.run_cbmir([*OFFLINE, f"paths.log_dir={afile}/logs"], tmp_path, check=False)
    assert proc.returncode == 2
    _assert_one_line_error(proc, f"hydra.run.dir={afile}/logs/retrieval/runs/")
    assert "set paths.log_dir=DIR" in proc.stderr
    assert _store_entries(tmp_path) == []


def test_ivf_lists_beyond_the_database_rows_are_an_error() -> None:
    pytest.importorskip("faiss")
    from cbmir.retrieval.settings import RetrievalSettings

    def settings(nlist: int) -> RetrievalSettings:
        faiss = {"kind": "ivf", "params": {"nlist": nlist}}
        return RetrievalSettings.from_config({"backend": "faiss", "faiss": faiss})

    with pytest.raises(ConfigError, match="faiss nlist=547 exceeds the 546 database rows"):
        settings(547).check_database(546)
    settings(546).check_database(546)


@pytest.mark.parametrize(
    ("schema", "conf", "key", "message"),
    [
        (
            RetrievalSettings,
            {"k": "five"},
            "retrieval",
            "retrieval.k must be an integer, got 'five'",
        ),
        (RetrievalSettings, {"acc_ks": [1, 2.5]}, "retrieval", "retrieval.acc_ks[1] must be an"),
        (RetrievalSettings, {"acc_ks": 3}, "retrieval", "retrieval.acc_ks must be a list of int"),
        (
            RetrievalSettings,
            {"faiss": {"params": {"nprobe": "x"}}},
            "retrieval",
            "retrieval.faiss.params.nprobe must be an integer or null, got 'x'",
        ),
        (
            RetrievalSettings,
            {"faiss": {"kindd": "ivf"}},
            "retrieval",
            "unknown key retrieval.faiss.kindd; allowed: kind, params",
        ),
        (RetrievalSettings, {"search": {"rerank": "maybe"}}, "retrieval", "rerank must be true or"),
        (RetrievalSettings, {"faiss": 3}, "retrieval", "retrieval.faiss must be a mapping, got 3"),
        (
            RetrievalSettings,
            {"k": "5"},
            "retrieval",
            "retrieval.k must be an integer, got '5' (str)",
        ),
        (JobSchema, {"resume": "auto", "data": {"batch_size": "64"}}, "", "data.batch_size must"),
        (
            RetrievalSettings,
            {"prompts": {"template": ["{}"]}},
            "retrieval",
            "unknown key retrieval.prompts.template; allowed: templates, classes",
        ),
        (JobSchema, {"data": {"num_workers": "x"}}, "", "data.num_workers must be an integer"),
        (JobSchema, {"gallery": {"n_queries": -2}}, "", "gallery.n_queries (0: no gallery) must"),
        (VolumeSpec, {"axes": [0, "y"]}, "model.volume", "model.volume.axes[1] must be an integer"),
        (VolumeSpec, {"reduction": "max"}, "model.volume", "unknown key model.volume.reduction"),
    ],
)
def test_schema_errors_name_the_key_and_what_it_accepts(schema, conf, key, message) -> None:
    """`typed` is where OmegaConf's type and key errors become one-line ConfigErrors (exit
    code 2 through the job wrapper), each naming the key by its place in the config."""
    with pytest.raises(ConfigError) as raised:
        typed(schema, conf, key)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    shown = None if raised.value.__suppress_context__ else raised.value.__context__
    assert shown is None  # no OmegaConf traceback chained under it


def test_schemas_keep_the_config_defaults() -> None:
    """A schema adds no key and changes no default of the yaml files: fingerprints and store
    keys are made of the composed config, which must be the same with or without it."""
    cfg = helpers.compose_config(OFFLINE)
    schema_keys = [f.name for f in dataclasses.fields(RetrievalSettings)]
    assert sorted(cfg.retrieval) == sorted(schema_keys)
    plain = OmegaConf.to_container(cfg.retrieval, resolve=True)
    assert typed(RetrievalSettings, cfg.retrieval, "retrieval").k == plain["k"]
    assert dataclasses.asdict(typed(VolumeSpec, cfg.model.volume, "model.volume")) == {
        **OmegaConf.to_container(cfg.model.volume),
        "axes": (0,),
    }


def test_the_precisions_passed_without_lightning_are_lightnings() -> None:
    """`check_precision` accepts COMMON_PRECISIONS without asking Lightning: each must be one
    Lightning accepts (its own list), else a bad precision would pass validation."""
    choices = lightning_precisions()
    assert all(p in choices and type(p) in {type(c) for c in choices} for p in COMMON_PRECISIONS)


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        ("npz", "file", "does not exist"),
        ("csv", "file", "does not exist"),
        ("folder", "folder", "is not a folder; data=folder expects DIR/<class>/<file>"),
    ],
)
def test_a_missing_data_path_is_one_line_before_the_data_module(tmp_path, data, kind, message):
    """data.path of npz/csv/folder is checked with the other paths (`validate_job`), before
    the pipeline and Lightning are imported; an existing one of the right kind passes."""
    missing = tmp_path / "missing.csv"
    cfg = helpers.compose_config([*OFFLINE, f"data={data}", f"data.path={missing}"])
    with pytest.raises(DataError, match=f"data.path={re.escape(str(missing.resolve()))} {message}"):
        check_data_source(cfg)
    present = tmp_path / "there"
    if kind == "file":
        present.write_bytes(b"")
    else:
        present.mkdir()
    check_data_source(helpers.compose_config([*OFFLINE, f"data={data}", f"data.path={present}"]))
    if kind == "folder":  # a file where a folder is expected
        cfg = helpers.compose_config([*OFFLINE, f"data={data}", f"data.path={missing.parent}/f"])
        (tmp_path / "f").write_bytes(b"")
        with pytest.raises(DataError, match="is not a folder"):
            check_data_source(cfg)
