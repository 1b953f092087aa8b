"""The optional faiss backend: same convention as knn_search, recall, persistence."""

import logging
import sys

import numpy as np
import pytest
import torch

from cbmir.errors import CbmirError, ConfigError
from cbmir.retrieval import faiss_backend as fb
from cbmir.retrieval import knn_search
from cbmir.retrieval import search as search_module

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


def _exact_order(q, x, k):
    """float64 direct differences (no ||q||^2 + ||x||^2 - 2 q.x), stable: lower index first."""
    dist = torch.cdist(q.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return dist.argsort(dim=1, stable=True)[:, :k]


def _torch_and_faiss_pass1(q, x, k, caplog):
    reference = knn_search(q, x, k, pass1="torch")
    with caplog.at_level(logging.DEBUG, logger="cbmir.retrieval.search"):
        via_faiss = knn_search(q, x, k, pass1="faiss")
    return reference, via_faiss


def test_faiss_pass1_gives_the_torch_result_with_ties_and_certificate(caplog):
    """Pass 1 from faiss' brute force: same neighbours, tie order (lower index first) and
    distances as the torch pass; 40 copies of a row overflow the 21-row shortlist, so the
    certificate must send that query to the exhaustive second pass."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3000, 16, generator=g)
    copies = torch.randperm(3000, generator=g)[:40]
    x[copies] = x[copies[0]].clone()
    x[2999] = x[11]  # one more exact tie, far apart in index
    q = torch.cat([x[copies[0]][None], x[11][None] + 1e-4, torch.randn(30, 16, generator=g)])
    (dt, it), (df, i_f) = _torch_and_faiss_pass1(q, x, 5, caplog)
    assert "pass 1 by faiss" in caplog.text
    assert "1 of 32 queries needed the exhaustive second pass" in caplog.text
    assert torch.equal(i_f, it) and torch.equal(df, dt)
    assert i_f[0].tolist() == sorted(copies.tolist())[:5]
    assert i_f[1, :2].tolist() == [11, 2999]
    exact = _exact_order(q, x, 5)
    assert torch.equal(i_f, exact)


def test_faiss_pass1_bound_catches_large_offset_cancellation(caplog):
    """||q||^2 + ||x||^2 - 2 q.x cancels catastrophically at 1000 +- 0.01: faiss' own ranking
    is wrong here, the certified result is exact. 500 x 256 query elements take faiss' BLAS
    path (from 128,000), not its direct per-pair distances."""
    g = torch.Generator().manual_seed(2)
    x = 1000.0 + 1e-2 * torch.randn(60, 256, generator=g)
    q = 1000.0 + 1e-2 * torch.randn(500, 256, generator=g)
    (dt, it), (df, i_f) = _torch_and_faiss_pass1(q, x, 5, caplog)
    exact = _exact_order(q, x, 5)
    assert torch.equal(i_f, exact) and torch.equal(i_f, it)
    assert torch.equal(df, dt)
    assert not torch.equal(fb.search(fb.build_index(x, "flat"), q, 5)[1], exact)


def test_auto_pass1_routes_large_databases_to_faiss(monkeypatch, caplog, clustered):
    q, x = clustered
    monkeypatch.setattr(search_module, "FAISS_MIN_ROWS", 2000)
    with caplog.at_level(logging.DEBUG, logger="cbmir.retrieval.search"):
        d, i = knn_search(q, x[:1999], 5)
        assert "pass 1 by faiss" not in caplog.text
        d2, i2 = knn_search(q, x, 5)
        assert "pass 1 by faiss" in caplog.text
    assert torch.equal(i2, knn_search(q, x, 5, pass1="torch")[1])


def test_faiss_scores_lie_within_their_bound():
    """faiss' float32 ||q||^2 + ||x||^2 - 2 q.x against float64 direct distances: every score is
    within `faiss_error` (the certificate's premise), and the error is real, not vacuous."""
    import faiss

    g = torch.Generator().manual_seed(9)
    x = 1000.0 + 1e-2 * torch.randn(60, 256, generator=g)
    q = 1000.0 + 1e-2 * torch.randn(500, 256, generator=g)
    db = search_module._Database.build(x, False, None)
    searcher = search_module._Searcher(db, k=5, db_chunk=60, score_dtype=None)
    queries = search_module._Queries.build(
        q, search_module._query_norms(q, cosine=False), False, None
    )
    scores, idx = searcher.faiss_shortlist(faiss, q, 60)
    true = torch.cdist(q.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    miss = (scores.double() - true.square().gather(1, idx)).abs()
    assert (miss <= searcher.faiss_error(queries)[:, None]).all()
    assert miss.max() > 1.0  # cancellation at ||q||^2 ~ 2.6e8: far above the true ~0.05


def test_faiss_pass1_runs_on_wide_tiles_and_restores_faiss_settings(monkeypatch, caplog):
    """faiss' database tile is process-wide: pass 1 sets its own (`_faiss_tile_rows`, not
    faiss' 1,024) and torch's thread count for the call only, restores the tile after it, and
    gives the same certified result as the torch pass."""
    import faiss

    seen = []
    real = faiss.knn_L2sqr

    def spy(*args):
        cvar = faiss.cvar
        seen.append(
            (
                cvar.distance_compute_blas_database_bs,
                cvar.distance_compute_blas_query_bs,
                faiss.omp_get_max_threads() == torch.get_num_threads(),
            )
        )
        return real(*args)

    monkeypatch.setattr(faiss, "knn_L2sqr", spy)
    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_database_bs", 777)
    g = torch.Generator().manual_seed(3)
    x, q = torch.randn(3000, 64, generator=g), torch.randn(300, 64, generator=g)
    (dt, it), (df, i_f) = _torch_and_faiss_pass1(q, x, 5, caplog)
    assert faiss.cvar.distance_compute_blas_database_bs == 777
    ((tile, query_tile, same_threads),) = seen
    assert tile == search_module._faiss_tile_rows(query_tile) and same_threads
    assert tile * query_tile * 4 <= max(search_module.BLOCK_BYTES, 1024 * query_tile * 4)
    assert tile == 8192 or query_tile != 4096  # faiss' default query tile: 8,192 rows
    assert torch.equal(i_f, it) and torch.equal(df, dt)
