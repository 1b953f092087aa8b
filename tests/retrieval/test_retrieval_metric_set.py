"""The full metric set (`retrieval.metrics`) against brute force and pytorch-metric-learning.

The brute force ranks the whole database with numpy (distance, then index: the search's tie
rule) and scores every query with plain loops from the definitions in docs/statistics.md.
Integer embeddings in {0, 1, 2} make many tied distances.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tests.helpers import compose_config

from cbmir.errors import ConfigError
from cbmir.pipeline import run_retrieval
from cbmir.retrieval import metric_names as mn
from cbmir.retrieval import metric_set as ms
from cbmir.retrieval.scoring import search_and_score
from cbmir.retrieval.search import knn_search

K = 5


def _data(seed: int, multilabel: bool = False):
    rng = np.random.default_rng(seed)
    db = rng.integers(0, 3, size=(70, 4)).astype(np.float32)
    q = rng.integers(0, 3, size=(25, 4)).astype(np.float32)
    if multilabel:
        return q, db, rng.integers(0, 2, size=(25, 3)), rng.integers(0, 2, size=(70, 3))
    # class 3 appears only among the queries: R = 0 for those
    return q, db, rng.integers(0, 4, size=25), rng.integers(0, 3, size=70)


def _relevant(ql, dl) -> bool:
    """The one rule of cbmir.retrieval.labels, written out: same class; multi-label: share a
    positive label, or both have none."""
    ql, dl = np.atleast_1d(ql), np.atleast_1d(dl)
    if ql.size == 1:
        return bool(ql[0] == dl[0])
    return bool((ql & dl).any()) or (not ql.any() and not dl.any())


def _brute_force(q, db, ql, dl) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {
        name: []
        for name in (
            f"precision@{K}",
            f"recall@{K}",
            f"ndcg@{K}",
            "mrr",
            "r_precision",
            "map@r",
            f"map@{K}",
            f"acc@{K}",
        )
    }
    for i in range(len(q)):
        dist = np.sqrt(((db - q[i]) ** 2).sum(axis=1))
        ranking = np.lexsort((np.arange(len(db)), dist))
        rel = [_relevant(ql[i], dl[j]) for j in ranking]
        r = sum(_relevant(ql[i], d) for d in dl)
        top = rel[:K]
        out[f"precision@{K}"].append(sum(top) / K)
        out[f"recall@{K}"].append(sum(top) / r if r else 0.0)
        dcg = sum(1 / math.log2(j + 2) for j in range(K) if top[j])
        idcg = sum(1 / math.log2(j + 2) for j in range(min(r, K)))
        out[f"ndcg@{K}"].append(dcg / idcg if idcg else 0.0)
        first = next((j for j in range(K) if top[j]), None)
        out["mrr"].append(0.0 if first is None else 1 / (first + 1))
        out["r_precision"].append(sum(rel[:r]) / r if r else 0.0)
        prec = [sum(rel[: j + 1]) / (j + 1) for j in range(len(rel))]
        out["map@r"].append(sum(prec[j] for j in range(r) if rel[j]) / r if r else 0.0)
        hits = [prec[j] for j in range(K) if top[j]]
        out[f"map@{K}"].append(sum(hits) / len(hits) if hits else 0.0)
        out[f"acc@{K}"].append(float(any(top)))
    return {name: np.array(v) for name, v in out.items()}


def _score(q, db, ql, dl, metrics="all"):
    def search(rows: torch.Tensor, width: int):
        return knn_search(q[rows.numpy()], db, width)

    return search_and_score(search, ql, dl, k=K, acc_ks=(1, 3, K), metrics=metrics)


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_every_metric_equals_brute_force_on_tied_data(multilabel, monkeypatch) -> None:
    q, db, ql, dl = _data(1, multilabel)
    expected = _brute_force(q, db, ql, dl)
    _, _, whole = _score(q, db, ql, dl)
    # tiny search blocks: the R search runs in many blocks of queries sorted by R
    monkeypatch.setattr(ms, "BLOCK_BYTES", 48 * 80)
    _, indices, blocks = _score(q, db, ql, dl)
    for result in (whole, blocks):
        for name, values in expected.items():
            np.testing.assert_allclose(result["per_query"][name], values, atol=1e-6, err_msg=name)
            assert result[name] == pytest.approx(values.mean(), abs=1e-6), name
    assert indices.shape == (len(q), K)  # only the top k is kept


def test_default_metric_set_is_the_papers_and_its_search_is_unchanged() -> None:
    q, db, ql, dl = _data(2)
    distances, indices, paper = _score(q, db, ql, dl, metrics=mn.PAPER_METRICS)
    assert list(paper) == [f"map@{K}", f"mmv@{K}", "acc@1", "acc@3", f"acc@{K}", "per_query"]
    d_all, i_all, every = _score(q, db, ql, dl)
    assert torch.equal(indices, i_all) and torch.equal(distances, d_all)
    for name in paper:
        if name != "per_query":
            assert every[name] == paper[name]


def test_map_at_r_and_r_precision_equal_pytorch_metric_learning() -> None:
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    rng = np.random.default_rng(3)
    q, db = rng.integers(0, 3, (30, 4)).astype(np.float32), rng.integers(0, 3, (80, 4))
    db = db.astype(np.float32)
    ql, dl = rng.integers(0, 3, 30), rng.integers(0, 3, 80)  # every query class is in db
    _, full = knn_search(q, db, len(db))  # the same neighbours for both

    def knn_func(query, k, reference, ref_includes_query):
        return torch.zeros(len(query), k), full[:, :k]

    calc = pml.AccuracyCalculator(
        include=("mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        knn_func=knn_func,
        device=torch.device("cpu"),
    )
    theirs = calc.get_accuracy(q, ql, db, dl, ref_includes_query=False)
    _, _, ours = _score(q, db, ql, dl, metrics=["r_precision", "map@r"])
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)


@pytest.mark.parametrize("value", [["map@k", "foo"], [], "precision", 5])
def test_unknown_metric_names_are_one_line_config_errors(value) -> None:
    with pytest.raises(ConfigError, match="map@k, mmv@k, acc@k, precision@k") as info:
        mn.check_metrics(value)
    assert "\n" not in str(info.value)
    assert mn.check_metrics("all") == mn.ALL_METRICS
    assert mn.check_metrics(["mrr", "mrr", "map@r"]) == ("mrr", "map@r")


def test_bad_metric_name_fails_before_any_embedding(tmp_path, make_synthetic) -> None:
    root = make_synthetic("breastmnist", 28).parent
    cfg = compose_config(
        [
            "model=pixels",
            "data.synthetic=true",
            "data.download=false",
            f"paths.synthetic_root={root}",
            f"paths.store={tmp_path / 'store'}",
            f"paths.output_dir={tmp_path / 'job'}",
            "retrieval.metrics=[map@k,ndcg]",
        ]
    )
    with pytest.raises(ConfigError, match=r"unknown retrieval.metrics \['ndcg'\]"):
        run_retrieval(cfg)
    assert not (tmp_path / "store").exists() and not (tmp_path / "job").exists()


def test_a_job_with_every_metric_writes_them_everywhere(tmp_path, make_synthetic) -> None:
    """metrics.json (value and interval), per_query.npz and the CSV logger's file."""
    root = make_synthetic("breastmnist", 28).parent
    job = tmp_path / "job"
    run_retrieval(
        compose_config(
            [
                "model=pixels",
                "data.synthetic=true",
                "data.download=false",
                f"paths.synthetic_root={root}",
                f"paths.store={tmp_path / 'store'}",
                f"paths.output_dir={job}",
                "gallery.n_queries=0",
                "retrieval.metrics=all",
            ]
        )
    )
    metrics = json.loads((job / "metrics.json").read_text())
    keys = ["precision@5", "recall@5", "ndcg@5", "mrr", "r_precision", "map@r", "map@5"]
    with np.load(job / "per_query.npz") as per_query:
        for key in keys:
            assert 0.0 <= metrics[key] <= 1.0
            low, high = metrics["ci95"][key]
            assert low <= metrics[key] <= high
            assert per_query[key].shape == (metrics["n_queries"],)
            assert per_query[key].mean() == pytest.approx(metrics[key], abs=1e-6)
    csv_files = list(job.rglob("metrics.csv"))
    assert csv_files, "the CSV logger wrote no metrics.csv"
    header = csv_files[0].read_text().splitlines()[0].split(",")
    assert {"map@r", "r_precision", "ndcg@5"} <= set(header)
