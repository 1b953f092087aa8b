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
from cbmir.retrieval.text_queries import PromptSettings, TextRetrievalCallback
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


def constructed_store(tmp_path: Path) -> EmbeddingStore:
    """Database images of class k point along axis k (plus noise off the class axes)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)[:, None]
    values = rng.normal(scale=0.2, size=(60, 8)).astype(np.float32)
    values[:, :3] = 0.0
    values[np.arange(60), labels[:, 0]] = 1.0 + rng.random(60).astype(np.float32)
    store = EmbeddingStore(tmp_path / "store")
    writer = store.open_writer("database", 60, 8, labels, {})
    writer.write(np.arange(60), values)
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
    with pytest.raises(ConfigError, match="query='words'"):
        text_queries.query_mode({"query": "words"})


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
    found = np.load(tmp_path / "run1" / "neighbors.npz")
    assert found["indices"].shape == (2, 5)
    assert (tmp_path / "run1" / "gallery.png").stat().st_size > 0

    from cbmir.pipeline import run_retrieval

    env = cbmir_env(tmp_path)
    dirs = [f"paths.{key}={env[var]}" for key, var in PATH_VARS.items()]
    overrides = [*args, *dirs, "retrieval.prompts.templates=['a scan of {}']"]
    run_retrieval(compose_config([*overrides, f"paths.output_dir={tmp_path / 'run2'}"]))
    again = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert again["embedded_now"] == []  # reused from the store
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
