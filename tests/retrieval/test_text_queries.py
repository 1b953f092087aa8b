"""`retrieval.query=text`: class prompts search the stored database split (docs/text.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.extractors.test_text_towers import TINY_TEXT_CLIP
from tests.helpers import cbmir_env, compose_config, run_cbmir

from cbmir.errors import ConfigError, DataError
from cbmir.extractors import text as text_towers
from cbmir.retrieval import text_queries
from cbmir.retrieval.settings import PromptSettings, RetrievalSettings
from cbmir.retrieval.text_queries import TextRetrievalCallback
from cbmir.store import EmbeddingStore

PATH_VARS = {
    "synthetic_root": "CBMIR_SYNTHETIC_ROOT",
    "store": "CBMIR_STORE",
    "log_dir": "CBMIR_LOG_DIR",
}
NAMES = {0: "adipose", 1: "mucus", 2: "stroma"}


class KeywordText:
    """A constructed text tower: a prompt naming class k maps to the k-th axis."""

    def __init__(self, **_: object) -> None:
        pass

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 8)
        for row, text in enumerate(texts):
            (k,) = [k for k, name in NAMES.items() if name in text]
            out[row, k] = 1.0
        return out

    def text_identity(self):
        return {"text_tower": "keywords"}


def constructed_store(tmp_path: Path, counts: tuple[int, ...] = (20, 20, 20)) -> EmbeddingStore:
    """Database images of class k point along axis k (plus noise off the class axes)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(counts)), counts)[:, None]
    n = len(labels)
    values = rng.normal(scale=0.2, size=(n, 8)).astype(np.float32)
    values[:, :3] = 0.0
    values[np.arange(n), labels[:, 0]] = 1.0 + rng.random(n).astype(np.float32)
    store = EmbeddingStore(tmp_path / "store")
    writer = store.open_writer("database", n, 8, labels, {})
    writer.write(np.arange(n), values)
    writer.commit()
    return store


def test_matching_towers_score_perfectly(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(text_towers.TEXT_TOWERS, "tests.KeywordText", KeywordText)
    prompts = PromptSettings.from_config({"templates": ["a photo of {}.", "{}"]})
    callback = TextRetrievalCallback(
        store=constructed_store(tmp_path),
        database_key="database",
        output_dir=tmp_path / "run",
        model_cfg={"_target_": "tests.KeywordText"},
        prompts=prompts.class_prompts(NAMES),
        label_names=NAMES,
        k=5,
        acc_ks=(1, 3, 5),
    )
    metrics = callback.evaluate()
    for name in ("map@5", "mmv@5", "acc@1", "acc@5", "zero_shot_acc", "zero_shot_balanced_acc"):
        assert metrics[name] == 1.0, name
    assert set(metrics["per_class"]) == set(NAMES.values())
    found = np.load(tmp_path / "run" / "neighbors.npz")
    assert found["indices"].shape == (3, 5)
    assert list(found["query_texts"]) == ["adipose", "mucus", "stroma"]
    assert metrics["prompts"]["mucus"] == ["a photo of mucus.", "mucus"]


def test_swapped_prompts_score_zero(tmp_path, monkeypatch) -> None:
    """The metrics follow the prompts: name class 0 as class 1 and its hits vanish."""
    monkeypatch.setitem(text_towers.TEXT_TOWERS, "tests.KeywordText", KeywordText)
    prompts = PromptSettings.from_config({"classes": {0: "mucus", 1: "adipose"}})
    metrics = TextRetrievalCallback(
        store=constructed_store(tmp_path),
        database_key="database",
        output_dir=tmp_path / "run",
        model_cfg={"_target_": "tests.KeywordText"},
        prompts=prompts.class_prompts(NAMES),
        label_names=NAMES,
        k=5,
        acc_ks=(1,),
    ).evaluate()
    assert metrics["per_class"]["adipose"]["acc@1"] == 0.0
    assert metrics["per_class"]["stroma"]["acc@1"] == 1.0
    assert metrics["zero_shot_acc"] == pytest.approx(1 / 3)


def test_prompt_ensemble_normalises_each_prompt_then_the_mean() -> None:
    class Fixed:
        def encode_text(self, texts):
            return torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])[: len(texts)]

    vectors = text_queries.class_queries(Fixed(), {0: ["a", "b"], 1: ["c"]})
    s = 2**-0.5
    torch.testing.assert_close(vectors, torch.tensor([[s, s], [0.0, 1.0]]))


def test_prompt_errors() -> None:
    with pytest.raises(ConfigError, match="non-empty list"):
        PromptSettings.from_config({"templates": []})
    with pytest.raises(ConfigError, match="exactly one"):
        PromptSettings.from_config({"templates": ["no placeholder"]})
    with pytest.raises(ConfigError, match=r"class ids \[7\]"):
        PromptSettings.from_config({"classes": {7: "x"}}).class_prompts(NAMES)
    with pytest.raises(ConfigError, match="unknown retrieval.query 'words'"):
        RetrievalSettings.from_config({"query": "words"})


def test_multilabel_queries_are_one_hot_rows() -> None:
    rows = text_queries.query_labels([0, 2], np.zeros((4, 3), dtype=np.uint8))
    np.testing.assert_array_equal(rows, [[1, 0, 0], [0, 0, 1]])


def test_model_without_text_tower_stops_at_the_config_check() -> None:
    """Stage 1 of validation: before the data, the weights or any embedding."""
    from cbmir.validation import check_config

    for model in ("resnet50", "uni", "pixels"):
        with pytest.raises(ConfigError, match="has none.*biomedclip, conch"):
            check_config(compose_config([f"model={model}", "retrieval.query=text"]))


def test_text_config_validation_composes() -> None:
    from cbmir.validation import check_config

    cfg = compose_config(["model=biomedclip", "retrieval.query=text"])
    check_config(cfg)  # a text tower, default prompts
    bad = compose_config(["model=biomedclip", "retrieval.query=text", "retrieval.prompts.templates=[]"])  # fmt: skip
    with pytest.raises(ConfigError, match="templates"):
        check_config(bad)


def test_text_protocol_end_to_end(tmp_path) -> None:
    """A tiny open_clip model with random weights on synthetic BreastMNIST, as a user runs it;
    then other prompts reuse the stored database embeddings."""
    config = tmp_path / "tiny_clip.json"
    config.write_text(json.dumps({"model_cfg": TINY_TEXT_CLIP}))
    args = [
        "experiment=offline",
        "model=open_clip",
        "model.model_name=tiny-clip",
        "model.name=tinyclip",
        f"model.model_config={config}",
        "retrieval.query=text",
        "gallery.n_queries=2",
        "trainer.enable_progress_bar=false",
    ]
    run_cbmir([*args, f"hydra.run.dir={tmp_path / 'run1'}"], tmp_path)
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert metrics["query"] == "text" and metrics["n_queries"] == 2
    assert metrics["embedded_now"] == ["train"]  # the database split only
    assert metrics["n_database"] == 546
    assert 0.0 <= metrics["zero_shot_acc"] <= 1.0 and 0.0 <= metrics["map@5"] <= 1.0
    assert set(metrics["per_class"]) == {"malignant", "normal, benign"}
    assert np.load(tmp_path / "run1" / "per_query.npz")["map@5"].shape == (2,)
    found = np.load(tmp_path / "run1" / "neighbors.npz")
    assert found["indices"].shape == (2, 5)
    assert (tmp_path / "run1" / "gallery.png").stat().st_size > 0

    from cbmir.pipeline import run_retrieval

    env = cbmir_env(tmp_path)
    dirs = [f"paths.{key}={env[var]}" for key, var in PATH_VARS.items()]
    overrides = [*args, *dirs, "retrieval.prompts.templates=['a scan of {}']"]
    overrides.append("retrieval.metrics=[map@k,map@r]")  # the configured metric set
    run_retrieval(compose_config([*overrides, f"paths.output_dir={tmp_path / 'run2'}"]))
    again = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert again["embedded_now"] == []  # reused from the store
    per_query = np.load(tmp_path / "run2" / "per_query.npz")
    assert sorted(per_query.files) == ["map@5", "map@r"] and per_query["map@r"].shape == (2,)
    assert again["map@r"] == pytest.approx(float(per_query["map@r"].mean()))
    assert again["ci95"] == {}  # two class queries: no interval
    assert again["database_entry"] == metrics["database_entry"]
    assert again["prompts"]["malignant"] == ["a scan of malignant"]

    # cbmir-query --text: a sentence equal to run2's one prompt finds run2's neighbours
    from cbmir.query.cli import main as query_main

    out = tmp_path / "q.png"
    with pytest.raises(SystemExit) as exit_code:
        query_main(["--text", "a scan of malignant", "--run", str(tmp_path / "run2"), "--out", str(out)])  # fmt: skip
    assert exit_code.value.code == 0 and out.stat().st_size > 0
    from cbmir.query.database import open_database
    from cbmir.query.text import search_text

    _, rows = search_text(open_database(tmp_path / "run2"), ["a scan of malignant"], 5)
    np.testing.assert_array_equal(
        rows[0], np.load(tmp_path / "run2" / "neighbors.npz")["indices"][0]
    )


def test_datamodule_without_names_is_a_data_error() -> None:
    class NoNames:
        name = "custom"
        label_names: dict = {}

    with pytest.raises(DataError, match="no class names"):
        text_queries.dataset_prompts({}, NoNames())


def test_image_job_fingerprints_ignore_the_text_settings() -> None:
    """Image jobs finished before `retrieval.query`/`prompts` existed still count as finished;
    text jobs with other prompts do not."""
    from omegaconf import OmegaConf, open_dict

    from cbmir.resume import fingerprint

    cfg = compose_config(["paths.output_dir=/tmp/x"])
    old = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(old):
        del old.retrieval["query"], old.retrieval["prompts"]
    assert fingerprint(cfg) == fingerprint(old)
    text = compose_config(["paths.output_dir=/tmp/x", "retrieval.query=text"])
    other = compose_config(
        ["paths.output_dir=/tmp/x", "retrieval.query=text", "retrieval.prompts.templates=['{}']"]
    )
    assert len({fingerprint(cfg), fingerprint(text), fingerprint(other)}) == 3


def test_text_jobs_from_before_the_metric_set_run_again(monkeypatch) -> None:
    """Text jobs finished before text runs read `retrieval.metrics` (paper metrics whatever
    the config said, no per_query.npz) must not be resumed: what text jobs compute is in their
    fingerprint, not in image jobs'."""
    from cbmir import resume

    text = compose_config(["paths.output_dir=/tmp/x", "retrieval.query=text", "retrieval.metrics=all"])  # fmt: skip
    image = compose_config(["paths.output_dir=/tmp/x"])
    now = resume.fingerprint(text), resume.fingerprint(image)
    monkeypatch.setattr(resume, "TEXT_RESULTS", 1)
    assert resume.fingerprint(text) != now[0]
    assert resume.fingerprint(image) == now[1]


def test_paper_text_is_the_vlms_over_the_papers_2d_grid() -> None:
    from tests.sweeps.test_sweep_presets import expand, job_key

    jobs = {job_key(overrides) for overrides in expand("paper_text")}
    models = {"openclip_vitg14", "conch", "medclip", "biomedclip"}
    assert {m for _, _, m in jobs} == models
    assert len(jobs) == 6 * 4 * 4
    paper = {job_key(overrides) for overrides in expand("paper")}
    assert jobs == {job for job in paper if job[2] in models and job[0] in (28, 64, 128, 224)} - {
        job for job in paper if job[1].endswith("3d")
    }
    cfg = compose_config(["experiment=paper_text", "model=conch", "cell=pathmnist@64"])
    assert cfg.retrieval.query == "text" and cfg.data.size == 64


def test_report_puts_text_rows_beside_image_rows() -> None:
    from omegaconf import OmegaConf

    from cbmir.report.collect import _with_query

    text = OmegaConf.create({"retrieval": {"query": "text"}})
    image = OmegaConf.create({"retrieval": {"query": "image"}})
    assert _with_query("", text) == "text" and _with_query("k=10", text) == "text,k=10"
    assert _with_query("", image) == "" and _with_query("", None) == ""


class BlurredText(KeywordText):
    """Class k's prompt points along axis k with a share of axis k + 1: the classes overlap,
    so the ranking is imperfect and every metric has something to get wrong."""

    def encode_text(self, texts):
        out = super().encode_text(texts)
        return out + 0.95 * out.roll(1, dims=1)


def brute_force(store: EmbeddingStore, vectors: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per class query, from a full argsort: recall@k and nDCG@k over the class's database
    count R, R-precision and MAP@R (independent of cbmir's metric code)."""
    entry = store.load("database")
    db = np.asarray(entry.embeddings, dtype=np.float64)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    labels = np.asarray(entry.labels).reshape(-1)
    out: dict[str, list[float]] = {"recall@5": [], "ndcg@5": [], "r_precision": [], "map@r": []}
    for c, v in enumerate(vectors):
        order = np.argsort(-(db @ (v / np.linalg.norm(v))), kind="stable")
        rel = (labels[order] == c).astype(np.float64)
        r = int((labels == c).sum())
        disc = 1 / np.log2(np.arange(2, k + 2))
        out["recall@5"].append(rel[:k].sum() / r)
        out["ndcg@5"].append((rel[:k] * disc).sum() / disc[: min(r, k)].sum())
        out["r_precision"].append(rel[:r].mean())
        precision = np.cumsum(rel[:r]) / np.arange(1, r + 1)
        out["map@r"].append((precision * rel[:r]).sum() / r)
    return {name: np.asarray(v) for name, v in out.items()}


def test_text_runs_score_the_configured_metrics_per_class_prompt(tmp_path, monkeypatch) -> None:
    """`retrieval.metrics=all` on class prompts: R of a prompt is its class's database count
    (10, 20, 30 here), per_query.npz has one row per prompt, the loggers get every metric."""
    from lightning import Trainer
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.setitem(text_towers.TEXT_TOWERS, "tests.BlurredText", BlurredText)
    store = constructed_store(tmp_path, counts=(10, 20, 30))
    prompts = PromptSettings.from_config({"templates": ["{}"]}).class_prompts(NAMES)
    logger = CSVLogger(tmp_path / "logs", name="", version="")
    trainer = Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False)
    metrics = TextRetrievalCallback(
        store=store,
        database_key="database",
        output_dir=tmp_path / "run",
        model_cfg={"_target_": "tests.BlurredText"},
        prompts=prompts,
        label_names=NAMES,
        k=5,
        acc_ks=(1, 3, 5),
        metrics="all",
    ).evaluate(trainer)
    per_query = dict(np.load(tmp_path / "run" / "per_query.npz"))
    keys = {"map@5", "mmv@5", "acc@1", "acc@3", "acc@5", "precision@5", "recall@5", "ndcg@5"}
    assert set(per_query) == keys | {"mrr", "r_precision", "map@r"}
    vectors = BlurredText().encode_text([p[0] for p in prompts.values()]).numpy()
    for name, expected in brute_force(store, vectors, 5).items():
        np.testing.assert_allclose(per_query[name], expected, atol=1e-6, err_msg=name)
    assert 0.0 < per_query["map@r"].min() < 1.0  # the blur leaves something to get wrong
    for name, values in per_query.items():
        assert values.shape == (3,)
        assert metrics[name] == pytest.approx(float(values.mean()), abs=1e-6), name
        assert [metrics["per_class"][NAMES[c]][name] for c in range(3)] == pytest.approx(values)
    assert metrics["ci95"] == {}  # 3 class queries: no interval (docs/text.md)
    logged = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"map@r", "r_precision", "recall@5", "zero_shot_acc"} <= set(logged)


def test_text_runs_default_to_the_papers_metrics(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(text_towers.TEXT_TOWERS, "tests.KeywordText", KeywordText)
    TextRetrievalCallback(
        store=constructed_store(tmp_path),
        database_key="database",
        output_dir=tmp_path / "run",
        model_cfg={"_target_": "tests.KeywordText"},
        prompts=PromptSettings.from_config({}).class_prompts(NAMES),
        label_names=NAMES,
        k=3,
        acc_ks=(1, 3),
    ).evaluate()
    assert set(np.load(tmp_path / "run" / "per_query.npz")) == {"map@3", "mmv@3", "acc@1", "acc@3"}
    with pytest.raises(ConfigError, match="unknown retrieval.metrics"):
        TextRetrievalCallback(
            store=None, database_key="", output_dir=tmp_path, model_cfg={}, prompts={},
            label_names={}, k=3, acc_ks=(1,), metrics=["hits"],
        )  # fmt: skip


def test_intervals_need_enough_queries() -> None:
    """A bootstrap over 2-4 class queries is no 95% interval; from 5 on it is the usual one."""
    from cbmir.retrieval.bootstrap import bootstrap_cis
    from cbmir.retrieval.callback import MIN_CI_QUERIES, query_intervals

    few = {"map@5": np.array([0.1, 0.9, 0.4, 0.7])}
    assert query_intervals(few) == {}
    enough = {"map@5": np.linspace(0.0, 1.0, MIN_CI_QUERIES)}
    assert query_intervals(enough) == {"map@5": list(bootstrap_cis(enough)["map@5"])}


def test_report_keeps_a_text_run_without_intervals(tmp_path, monkeypatch) -> None:
    """An empty ci95 (too few class queries) is not recomputed from per_query.npz."""
    from cbmir.report.collect import _intervals

    monkeypatch.setitem(text_towers.TEXT_TOWERS, "tests.KeywordText", KeywordText)
    metrics = TextRetrievalCallback(
        store=constructed_store(tmp_path),
        database_key="database",
        output_dir=tmp_path / "run",
        model_cfg={"_target_": "tests.KeywordText"},
        prompts=PromptSettings.from_config({}).class_prompts(NAMES),
        label_names=NAMES,
        k=5,
        acc_ks=(1,),
    ).evaluate()
    assert (tmp_path / "run" / "per_query.npz").is_file()
    assert _intervals(tmp_path / "run", metrics) == {}


def test_text_jobs_pair_only_with_text_jobs_of_the_same_prompts(tmp_path, monkeypatch) -> None:
    """Same class count and labels as an image job, or as a text job with other prompts, is
    still another query set: the report refuses to pair them."""
    import json as json_

    from cbmir.report import significance as sig

    monkeypatch.setitem(text_towers.TEXT_TOWERS, "tests.KeywordText", KeywordText)
    store = constructed_store(tmp_path)

    def run(name: str, templates: list[str]) -> sig.QueryResults:
        TextRetrievalCallback(
            store=store,
            database_key="database",
            output_dir=tmp_path / name,
            model_cfg={"_target_": "tests.KeywordText"},
            prompts=PromptSettings.from_config({"templates": templates}).class_prompts(NAMES),
            label_names=NAMES,
            k=5,
            acc_ks=(1,),
        ).evaluate()
        metrics = json_.loads((tmp_path / name / "metrics.json").read_text())
        return sig.load_query_results(tmp_path / name, metrics, "test")

    a, same, other = run("a", ["{}"]), run("b", ["{}"]), run("c", ["a photo of {}"])
    sig.check_pairable({"A": a, "B": same})
    image = tmp_path / "image"  # an image job with 3 queries of the very same labels
    image.mkdir()
    for name in ("per_query.npz", "neighbors.npz"):
        (image / name).write_bytes((tmp_path / "a" / name).read_bytes())
    as_image = sig.load_query_results(image, {"n_queries": 3}, "test")
    for b in (other, as_image):
        with pytest.raises(DataError, match="did not answer the same queries"):
            sig.check_pairable({"A": a, "B": b})


def test_text_callback_leaves_ddp_scoring_to_rank_0(tmp_path, monkeypatch) -> None:
    """Under DDP every rank's on_predict_end returns at once; the pipeline calls evaluate()
    on rank 0 after the ranks part (as for image queries)."""
    from lightning import Trainer

    monkeypatch.setitem(text_towers.TEXT_TOWERS, "tests.KeywordText", KeywordText)
    callback = TextRetrievalCallback(
        store=constructed_store(tmp_path),
        database_key="database",
        output_dir=tmp_path / "run",
        model_cfg={"_target_": "tests.KeywordText"},
        prompts=PromptSettings.from_config({}).class_prompts(NAMES),
        label_names=NAMES,
        k=5,
        acc_ks=(1,),
    )
    ddp = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert ddp.world_size == 2
    callback.on_predict_end(ddp, None)
    assert callback.metrics is None and not (tmp_path / "run").exists()
    callback.on_predict_end(Trainer(accelerator="cpu", devices=1, logger=False), None)
    assert callback.metrics is not None and (tmp_path / "run" / "per_query.npz").is_file()


def test_report_tabulates_and_pairs_text_jobs(tmp_path, monkeypatch) -> None:
    """Two finished text jobs (two towers, same prompts) in a sweep: rows "text" with the same
    metric columns as image rows, no intervals from 3 classes, and paired with each other."""
    from omegaconf import OmegaConf

    from cbmir.io_utils import write_json, write_text
    from cbmir.report.collect import collect, finished
    from cbmir.report.stats_report import sweep_significance
    from cbmir.resume import job_record

    store = constructed_store(tmp_path, counts=(10, 20, 30))
    sweep = tmp_path / "sweep"
    for model, tower in (("biomedclip", KeywordText), ("conch", BlurredText)):
        monkeypatch.setitem(text_towers.TEXT_TOWERS, f"tests.{tower.__name__}", tower)
        job = sweep / model
        cfg = compose_config(
            [f"model={model}", "retrieval.query=text", "data.size=28", f"paths.output_dir={job}"]
        )
        TextRetrievalCallback(
            store=store,
            database_key="database",
            output_dir=job,
            model_cfg={"_target_": f"tests.{tower.__name__}"},
            prompts=PromptSettings.from_config({}).class_prompts(NAMES),
            label_names=NAMES,
            k=5,
            acc_ks=(1, 3, 5),
            metrics="all",
        ).evaluate()
        write_text(job / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_json(job / "job.json", job_record(cfg, "success"))
    done = finished(collect(sweep)).set_index("model")
    assert list(done["setting"]) == ["text", "text"]
    for model in ("biomedclip", "conch"):
        metrics = json.loads((sweep / model / "metrics.json").read_text())
        for key, col in (("map@5", "map_at_5"), ("map@r", "map_at_r"), ("mrr", "mrr")):
            assert done.loc[model, col] == pytest.approx(100 * metrics[key])
        assert np.isnan(done.loc[model, "map_at_5_low"])  # ci95 {}: not recomputed
    pairs = sweep_significance(done.reset_index(), sweep, n_permutations=100).pairs
    assert set(pairs["setting"]) == {"text"} and "map@r" in set(pairs["metric"])
    assert (pairs["p"] >= 0.25).all()  # 3 class queries: exact sign flips, p >= 2 / 2^3
