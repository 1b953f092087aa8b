"""The optional faiss backend: same convention as knn_search, recall, persistence."""

import sys

import numpy as np
import pytest
import torch

from cbmir.errors import CbmirError, ConfigError
from cbmir.retrieval import faiss_backend as fb
from cbmir.retrieval import knn_search

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 32)).astype(np.float32) * 3
    x = centers[rng.integers(0, 20, 2000)] + rng.standard_normal((2000, 32)).astype(np.float32)
    q = centers[rng.integers(0, 20, 200)] + rng.standard_normal((200, 32)).astype(np.float32)
    return q, x


def _recall(found, truth):
    return np.mean(
        [len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist(), strict=True)]
    )


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_flat_equals_torch_exact(clustered, distance):
    q, x = clustered
    index = fb.build_index(x, "flat", distance)
    d, i = fb.search(index, q, 5)
    td, ti = knn_search(q, x, 5, distance)
    assert torch.equal(i, ti)
    assert torch.allclose(d, td, atol=1e-3)
    assert d.dtype == torch.float32 and i.dtype == torch.int64


@pytest.mark.parametrize(
    ("kind", "params"), [("ivf", {"nlist": 32, "nprobe": 8}), ("hnsw", {"M": 16})]
)
def test_approximate_indexes_have_high_recall(clustered, kind, params):
    q, x = clustered
    truth = knn_search(q, x, 5)[1]
    found = fb.search(fb.build_index(x, kind, "euclidean", **params), q, 5)[1]
    assert _recall(found, truth) >= 0.9


def test_save_load_round_trip(tmp_path, clustered):
    q, x = clustered
    index = fb.build_index(x, "ivf", "cosine", nlist=16)
    path = fb.save_index(index, tmp_path / "sub" / "db.faiss")
    assert [p.name for p in path.parent.iterdir()] == ["db.faiss"]  # no temp file left
    loaded = fb.load_index(path)
    fb.set_search_params(loaded, nprobe=16)
    fb.set_search_params(index, nprobe=16)
    a, b = fb.search(index, q, 5), fb.search(loaded, q, 5)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    with pytest.raises(CbmirError, match="no faiss index"):
        fb.load_index(tmp_path / "missing.faiss")


def test_backend_dispatch_reuses_a_matching_saved_index(tmp_path, clustered, monkeypatch):
    q, x = clustered
    path = tmp_path / "db.faiss"
    first = fb.knn_search_backend(
        q, x, 5, backend="faiss", faiss_kind="ivf", index_path=path, nlist=8
    )
    assert path.is_file() and (tmp_path / "db.faiss.json").is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("index should have been reused")

    monkeypatch.setattr(fb, "build_index", no_build)
    again = fb.knn_search_backend(
        q, x, 5, backend="faiss", faiss_kind="ivf", index_path=path, nlist=8
    )
    assert torch.equal(first[1], again[1])
    with pytest.raises(AssertionError, match="reused"):  # other data -> rebuild
        fb.knn_search_backend(
            q, x[:-1], 5, backend="faiss", faiss_kind="ivf", index_path=path, nlist=8
        )
    with pytest.raises(AssertionError, match="reused"):  # other parameters -> rebuild
        fb.knn_search_backend(q, x, 5, backend="faiss", faiss_kind="ivf", index_path=path, nlist=9)
    torch_result = fb.knn_search_backend(q, x, 5, backend="torch", db_chunk=100)
    assert torch.equal(torch_result[1], knn_search(q, x, 5)[1])


def test_errors(clustered, monkeypatch):
    q, x = clustered
    with pytest.raises(ConfigError, match="flat, ivf, hnsw"):
        fb.build_index(x, "lsh")
    with pytest.raises(ConfigError, match="euclidean, cosine"):
        fb.build_index(x, "flat", "dot")
    with pytest.raises(ConfigError, match="nlist"):
        fb.build_index(x, "flat", nlist=4)
    with pytest.raises(ConfigError, match="torch, faiss"):
        fb.knn_search_backend(q, x, 5, backend="annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(CbmirError, match="pip install faiss-cpu"):
        fb.build_index(x)
