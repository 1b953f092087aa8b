"""Hand-computed metric values, torchmetrics agreement and the torchmetrics score trap."""

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from cbmir.errors import ConfigError
from cbmir.retrieval import MajorityVoteAccuracy, compute_retrieval_metrics
from cbmir.retrieval.metrics import (
    average_precision_at_k,
    hit_at_k,
    majority_vote_correct,
    rank_scores,
    relevance_patterns,
)


def _rel(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_average_precision_by_hand():
    rel = _rel([1, 0, 1, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1])
    ap = average_precision_at_k(rel, 5)
    # (1/1 + 2/3) / 2 ; (1/2 + 2/5) / 2 ; none ; all
    assert ap.tolist() == pytest.approx([5 / 6, 0.45, 0.0, 1.0])
    # only the top 3 count, divided by the relevant within the top 3
    assert average_precision_at_k(rel, 3).tolist() == pytest.approx([5 / 6, 0.5, 0.0, 1.0])


def test_hit_at_k_by_hand():
    rel = _rel([0, 0, 1], [1, 0, 0], [0, 0, 0])
    assert hit_at_k(rel, 1).tolist() == [0.0, 1.0, 0.0]
    assert hit_at_k(rel, 3).tolist() == [1.0, 1.0, 0.0]


def test_torchmetrics_map_divides_by_relevant_within_top_k():
    """torchmetrics 1.9: AP@k normalises by relevant items in the top k, not all relevant."""
    preds = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    target = torch.tensor([True, False, True, False, False, True])  # 3rd relevant at rank 6
    metric = RetrievalMAP(top_k=5)
    metric.update(preds, target, torch.zeros(6, dtype=torch.long))
    assert float(metric.compute()) == pytest.approx(5 / 6)  # not (1 + 2/3) / 3


def test_torchmetrics_trap_nonpositive_scores_count_as_irrelevant():
    target = torch.tensor([True, False, True, False, False])
    indexes = torch.zeros(5, dtype=torch.long)
    negated_distances = -torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    trap = RetrievalMAP(top_k=5)
    trap.update(negated_distances, target, indexes)
    assert float(trap.compute()) == 0.0  # silently wrong
    negative_cosines = torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5])
    trap = RetrievalMAP(top_k=5)
    trap.update(negative_cosines, target, indexes)
    assert float(trap.compute()) == 0.0
    ok = RetrievalMAP(top_k=5)
    ok.update(rank_scores(1, 5).reshape(-1), target, indexes)
    assert float(ok.compute()) == pytest.approx(5 / 6)
    # and our full path gets the right value for the same ranking
    labels_db = np.array([0, 1, 0, 1, 1])
    out = compute_retrieval_metrics(torch.arange(5)[None], np.array([0]), labels_db, acc_ks=(1,))
    assert out["map@5"] == pytest.approx(5 / 6)


def test_rank_scores_strictly_positive_and_decreasing():
    s = rank_scores(2, 5)
    assert (s > 0).all()
    assert (s[:, 1:] < s[:, :-1]).all()


def test_majority_vote_ties_single_label():
    hot = torch.eye(3, dtype=torch.bool)

    def mv(query, neighbours, k):
        q, n = torch.tensor([query]), torch.tensor([neighbours])
        return majority_vote_correct(hot[q], hot[n], k).item()

    assert mv(1, [0, 0, 1, 1], 4) == 1.0  # tie 0/1, query class among tied
    assert mv(2, [0, 0, 1, 1], 4) == 0.0  # tie 0/1, query class not tied
    assert mv(0, [0, 0, 1, 1, 2], 5) == 1.0
    assert mv(2, [0, 0, 1, 1, 2], 5) == 0.0  # one vote is not a winner
    assert mv(1, [0, 0, 0, 1, 1], 5) == 0.0  # clear majority elsewhere
    assert mv(1, [0, 0, 0, 1, 1], 1) == 0.0  # only the first neighbour votes
    assert mv(2, [2, 0, 0, 1, 1], 1) == 1.0


def test_majority_vote_multilabel():
    def mv(query, neighbours):
        q = torch.tensor([query + [not any(query)]], dtype=torch.bool)
        n = torch.tensor([[row + [not any(row)] for row in neighbours]], dtype=torch.bool)
        return majority_vote_correct(q, n, len(neighbours)).item()

    neighbours = [[1, 1, 0], [0, 1, 0], [0, 1, 0]]  # votes: label0 1, label1 3
    assert mv([1, 0, 0], neighbours) == 0.0
    assert mv([0, 1, 0], neighbours) == 1.0
    no_finding = [[0, 0, 0], [0, 0, 0], [1, 0, 0]]  # "no positive" column wins 2:1
    assert mv([0, 0, 0], no_finding) == 1.0
    assert mv([1, 0, 0], no_finding) == 0.0


def test_majority_vote_metric_accumulates_and_resets():
    hot = torch.eye(2, dtype=torch.bool)
    metric = MajorityVoteAccuracy(k=3)
    t = torch.tensor
    metric.update(hot[t([0])], hot[t([[0, 0, 1]])])  # correct
    metric.update(hot[t([1, 1])], hot[t([[0, 0, 1], [1, 1, 0]])])  # wrong, correct
    assert float(metric.compute()) == pytest.approx(2 / 3)
    metric.reset()
    metric.update(hot[t([1])], hot[t([[0, 0, 1]])])
    assert float(metric.compute()) == 0.0
    with pytest.raises(ConfigError):
        MajorityVoteAccuracy(k=0)


def test_compute_metrics_hand_case_and_keys():
    db_labels = np.array([0, 1, 0, 1, 1, 2])
    query_labels = np.array([0, 1, 2])
    indices = torch.tensor([[0, 1, 2, 3, 4], [1, 0, 2, 5, 5], [0, 1, 2, 3, 4]])
    out = compute_retrieval_metrics(indices, query_labels, db_labels)
    assert list(out) == ["map@5", "mmv@5", "acc@1", "acc@3", "acc@5"]
    assert all(isinstance(v, float) for v in out.values())
    # query 0: rel 1 0 1 0 0 -> AP 5/6, votes 0:2 1:3 -> wrong, hits @1 @3 @5
    # query 1: rel 1 0 0 0 0 -> AP 1, votes 0:2 1:1 2:2 -> wrong, hits @1 @3 @5
    # query 2: no relevant -> 0 everywhere
    assert out["map@5"] == pytest.approx((5 / 6 + 1.0) / 3)
    assert out["mmv@5"] == pytest.approx(0.0)
    assert out["acc@1"] == pytest.approx(2 / 3)
    assert out["acc@5"] == pytest.approx(2 / 3)
    custom = compute_retrieval_metrics(
        indices, query_labels, db_labels, map_k=3, acc_ks=(2,), mmv_k=1
    )
    assert list(custom) == ["map@3", "mmv@1", "acc@2"]
    assert custom["mmv@1"] == pytest.approx(2 / 3)


def test_per_query_means_equal_torchmetrics_values():
    rng = np.random.default_rng(0)
    indices = torch.from_numpy(rng.integers(0, 300, (257, 7)))
    for q_lab, d_lab in (
        (rng.integers(0, 4, 257), rng.integers(0, 4, 300)),
        (
            rng.integers(0, 2, (257, 5)) * (rng.random((257, 1)) < 0.5),
            rng.integers(0, 2, (300, 5)) * (rng.random((300, 1)) < 0.5),
        ),
    ):
        out = compute_retrieval_metrics(indices, q_lab, d_lab, return_per_query=True)
        per_query = out.pop("per_query")
        assert set(per_query) == set(out)
        for key, value in out.items():
            assert per_query[key].shape == (257,)
            assert float(per_query[key].mean()) == pytest.approx(value, abs=1e-6)
        assert 0.0 < out["map@5"] < 1.0


def test_hit_rate_matches_torchmetrics_directly():
    rel = torch.from_numpy(np.random.default_rng(1).random((50, 5)) < 0.2)
    metric = RetrievalHitRate(top_k=3)
    metric.update(
        rank_scores(50, 3).reshape(-1),
        rel[:, :3].reshape(-1),
        torch.arange(50).repeat_interleave(3),
    )
    assert float(metric.compute()) == pytest.approx(float(hit_at_k(rel, 3).mean()))


def test_compute_metrics_errors():
    idx = torch.zeros((2, 3), dtype=torch.long)
    with pytest.raises(ConfigError, match="between 1 and the 3"):
        compute_retrieval_metrics(idx, np.array([0, 1]), np.array([0, 1]))
    with pytest.raises(ConfigError, match="query labels"):
        compute_retrieval_metrics(
            idx, np.array([0]), np.array([0, 1]), map_k=3, acc_ks=(1,), mmv_k=3
        )
    with pytest.raises(ConfigError, match="out of range"):
        compute_retrieval_metrics(
            idx + 5, np.array([0, 1]), np.array([0, 1]), map_k=3, acc_ks=(1,), mmv_k=3
        )


def test_relevance_patterns_count_every_query_once():
    rel = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    patterns, counts = relevance_patterns(rel)
    found = {tuple(p.tolist()): int(c) for p, c in zip(patterns, counts, strict=True)}
    assert found == {(True, False, True): 2, (False, False, False): 1, (True, True, True): 1}


def test_long_top_k_uses_the_generic_grouping():
    rng = np.random.default_rng(3)
    indices = torch.from_numpy(rng.integers(0, 100, (64, 20)))
    out = compute_retrieval_metrics(
        indices,
        rng.integers(0, 2, 64),
        rng.integers(0, 2, 100),
        map_k=17,
        acc_ks=(20,),
        mmv_k=3,
        return_per_query=True,
    )
    per_query = out.pop("per_query")
    for key, value in out.items():
        assert float(per_query[key].mean()) == pytest.approx(value, abs=1e-6)
