"""Label encoding and the relevance rule."""

import numpy as np
import pytest
import torch

from cbmir.errors import ConfigError, DataError
from cbmir.retrieval import to_multihot
from cbmir.retrieval.labels import encode_pair, relevance


def test_single_label_vector_and_column_give_the_same_one_hot():
    ids = np.array([2, 0, 1, 2])
    expected = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(to_multihot(ids), expected)
    assert torch.equal(to_multihot(ids[:, None]), expected)
    assert to_multihot(ids, num_classes=5).shape == (4, 5)


def test_single_label_errors():
    with pytest.raises(DataError, match=">= 0"):
        to_multihot(np.array([0, -1]))
    with pytest.raises(DataError, match="out of range"):
        to_multihot(np.array([0, 3]), num_classes=3)
    with pytest.raises(DataError, match="N x 1"):
        to_multihot(np.zeros((3, 2), dtype=int), multilabel=False)


def test_multilabel_adds_a_no_positive_column():
    labels = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    hot = to_multihot(labels)
    assert hot.shape == (3, 4)
    assert hot[:, -1].tolist() == [False, True, False]
    assert torch.equal(hot[:, :3], torch.from_numpy(labels).bool())


def test_multilabel_detection_and_explicit_flag():
    assert to_multihot(np.array([[1, 0], [0, 0]])).shape == (2, 3)  # auto: L > 1
    # N x 1 binary is single-label by default, but can be forced to multi-label
    assert to_multihot(np.array([[1], [0]])).shape == (2, 2)
    forced = to_multihot(np.array([[1], [0]]), multilabel=True)
    assert forced.tolist() == [[True, False], [False, True]]
    with pytest.raises(DataError, match="binary"):
        to_multihot(np.array([[2, 0], [0, 1]]))


def test_relevance_rule_multilabel_including_all_negative_rows():
    queries = np.array([[0, 0, 0], [1, 1, 0], [1, 0, 0]])
    db = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 0]])
    q_hot, d_hot = encode_pair(queries, db)
    idx = torch.tensor([[0, 1, 2, 3]] * 3)
    rel = relevance(q_hot, d_hot[idx])
    assert rel.tolist() == [
        [True, False, False, False],  # no finding ~ no finding only
        [False, True, True, True],  # shares label 0 or 1
        [False, True, False, False],  # only label 0
    ]


def test_single_label_relevance_uses_shared_class_count():
    q_hot, d_hot = encode_pair(np.array([4]), np.array([0, 4, 1]))
    assert q_hot.shape[1] == d_hot.shape[1] == 5
    assert relevance(q_hot, d_hot[torch.tensor([[0, 1, 2]])]).tolist() == [[False, True, False]]


def test_mixed_single_and_multilabel_is_rejected():
    with pytest.raises(ConfigError, match="both"):
        encode_pair(np.array([0, 1]), np.array([[1, 0], [0, 1]]))
