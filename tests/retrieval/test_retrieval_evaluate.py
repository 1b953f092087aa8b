"""End to end: embeddings + labels -> the paper's metrics."""

import numpy as np
import pytest
import torch

from cbmir.errors import ConfigError, EmbeddingError
from cbmir.retrieval import evaluate_retrieval
from cbmir.retrieval.settings import default_acc_ks


def _line(values):
    return np.array([[v, 0.0] for v in values], dtype=np.float32)


def test_paper_keys_and_hand_values():
    db = _line([0, 1, 2, 3, 4, 10, 11, 12])
    db_labels = np.array([0, 0, 1, 0, 1, 2, 2, 2])
    queries = _line([0.1, 10.4])
    query_labels = np.array([0, 1])
    out = evaluate_retrieval(queries, query_labels, db, db_labels, k=5)
    assert list(out) == ["map@5", "mmv@5", "acc@1", "acc@3", "acc@5", "n_queries", "n_database"]
    # q0 neighbours 0,1,2,3,4 -> labels 0 0 1 0 1: AP (1 + 1 + 3/4)/3, majority 0 -> correct
    # q1 neighbours 10,11,12,4,3 -> labels 2 2 2 1 0: AP 0 ... rel at rank 4: 1/4
    assert out["map@5"] == pytest.approx(((1 + 1 + 3 / 4) / 3 + 1 / 4) / 2)
    assert out["mmv@5"] == pytest.approx(0.5)
    assert out["acc@1"] == pytest.approx(0.5)
    assert out["acc@5"] == pytest.approx(1.0)
    assert out["n_queries"] == 2 and out["n_database"] == 8


def test_k3_caps_metric_ks_and_per_query():
    rng = np.random.default_rng(0)
    q, x = rng.standard_normal((20, 4)), rng.standard_normal((50, 4))
    out = evaluate_retrieval(
        q,
        rng.integers(0, 3, 20),
        x,
        rng.integers(0, 3, 50),
        k=3,
        distance="cosine",
        return_per_query=True,
        db_chunk=7,
    )
    assert list(out) == ["map@3", "mmv@3", "acc@1", "acc@3", "per_query", "n_queries", "n_database"]
    assert out["per_query"]["acc@3"].shape == (20,)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
def test_acc_cutoffs_follow_the_pipelines_default_rule(k):
    """The library call scores the ACC@ cut-offs a benchmark run of the same k reports by
    default (`retrieval.acc_ks`): at k = 2 and 4 it once added acc@2 / acc@4 instead."""
    rng = np.random.default_rng(k)
    out = evaluate_retrieval(
        rng.standard_normal((6, 3)), rng.integers(0, 2, 6), rng.standard_normal((9, 3)),
        rng.integers(0, 2, 9), k=k,
    )  # fmt: skip
    assert [m for m in out if m.startswith("acc@")] == [f"acc@{a}" for a in default_acc_ks(k)]


def test_nan_embeddings_and_label_mismatch_raise():
    x = torch.randn(10, 3)
    q = torch.randn(4, 3)
    q[1, 2] = float("nan")
    with pytest.raises(EmbeddingError, match="1 of 4"):
        evaluate_retrieval(q, np.zeros(4), x, np.zeros(10))
    with pytest.raises(ConfigError, match="10 database embeddings but 9"):
        evaluate_retrieval(q, np.zeros(4), x, np.zeros(9))
    with pytest.raises(ConfigError, match="4 query embeddings but 3"):
        evaluate_retrieval(q, np.zeros(3), x, np.zeros(10))
