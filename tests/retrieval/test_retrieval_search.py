"""Exact chunked k-NN against a brute-force reference."""

import numpy as np
import pytest
import torch

from cbmir.errors import ConfigError, EmbeddingError
from cbmir.retrieval import knn_search
from cbmir.retrieval.search import (
    GEMM_PIECE,
    _Database,
    _Queries,
    _query_norms,
    _Searcher,
    _smallest,
    chunk_sizes,
)


def brute_force(q, x, k, distance="euclidean"):
    """float64 distances for every pair, stable sort: ties go to the lower index."""
    q, x = torch.as_tensor(q).double(), torch.as_tensor(x).double()
    if distance == "cosine":
        qn = q / q.norm(dim=1, keepdim=True)
        xn = x / x.norm(dim=1, keepdim=True)
        d = 1.0 - qn @ xn.T
    else:
        d = torch.cdist(q, x)
    order = d.argsort(dim=1, stable=True)[:, :k]
    return d.gather(1, order).float(), order


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(97, 24, generator=g)
    x = torch.randn(613, 24, generator=g)
    for dup in (100, 200, 600):  # duplicated database rows: ties must go to the lower index
        x[dup] = x[7]
    q[5] = x[7]
    q[6] = x[7] + 1e-3
    return q, x


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunks", [(None, None), (16, 50), (1, 1), (50, 613)])
def test_chunked_search_equals_brute_force(data, distance, chunks):
    q, x = data
    if chunks == (1, 1):
        q = q[:12]  # one block per (query, row) pair: keep the loop short
    d, i = knn_search(q, x, 9, distance, query_chunk=chunks[0], db_chunk=chunks[1])
    bd, bi = brute_force(q, x, 9, distance)
    assert d.dtype == torch.float32 and i.dtype == torch.int64
    assert d.device.type == "cpu" and d.shape == (q.shape[0], 9)
    assert torch.equal(i, bi)
    assert torch.allclose(d, bd, atol=1e-5)
    assert (d[:, 1:] >= d[:, :-1]).all()
    assert i[5, :4].tolist() == [7, 100, 200, 600]


def test_many_duplicates_beyond_the_shortlist_go_to_lowest_indices():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 16, generator=g)
    positions = torch.randperm(500, generator=g)[:60]
    x[positions] = x[positions[0]].clone()
    q = x[positions[0]][None].clone()
    for db_chunk in (None, 37):
        d, i = knn_search(q, x, 5, db_chunk=db_chunk)
        assert i[0].tolist() == sorted(positions.tolist())[:5]
        assert torch.equal(d[0], torch.zeros(5))


def test_large_offset_cancellation_is_caught_and_fixed():
    """||q||^2 + ||x||^2 - 2 q.x cancels catastrophically here; the bound must catch it."""
    g = torch.Generator().manual_seed(2)
    x = 1000.0 + 1e-2 * torch.randn(400, 16, generator=g)
    q = 1000.0 + 1e-2 * torch.randn(20, 16, generator=g)
    d, i = knn_search(q, x, 5)
    bd, bi = brute_force(q, x, 5)
    assert torch.equal(i, bi)
    assert torch.allclose(d, bd, atol=1e-4)
    # the unverified GEMM ranking gets some of these wrong: the check above is not vacuous
    _, fast = knn_search(q, x, 5, rerank=False)
    assert not torch.equal(fast, bi)


def test_uncertified_queries_are_counted_and_searched_again():
    g = torch.Generator().manual_seed(3)
    x = 500.0 + 1e-2 * torch.randn(300, 8, generator=g)
    db = _Database.build(x, cosine=False, score_dtype=None)
    searcher = _Searcher(db, k=3, db_chunk=64, score_dtype=None)
    qs = _Queries.build(
        x[:10].clone(), _query_norms(x[:10], cosine=False), cosine=False, score_dtype=None
    )
    _, i = searcher.search(qs, m=8)
    assert searcher.n_uncertified > 0
    assert torch.equal(i, brute_force(x[:10], x, 3)[1])


def test_euclidean_and_cosine_pick_different_neighbours():
    q = torch.tensor([[1.0, 0.0]])
    x = torch.tensor([[10.0, 1.0], [1.2, 0.5]])  # far but aligned ; near but at an angle
    de, ie = knn_search(q, x, 1, "euclidean")
    dc, ic = knn_search(q, x, 1, "cosine")
    assert ie.item() == 1 and ic.item() == 0
    assert de.item() == pytest.approx(float(np.hypot(0.2, 0.5)))
    assert dc.item() == pytest.approx(1 - 10 / np.hypot(10, 1), abs=1e-6)  # float32 1 - cos


def _cpu_supports(dtype):
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_half_precision_scores_give_the_float32_result(data, dtype, distance):
    if not _cpu_supports(dtype):
        pytest.skip(f"{dtype} matmul not supported on this CPU build")
    q, x = data
    d16, i16 = knn_search(q, x, 9, distance, score_dtype=dtype, db_chunk=100)
    d32, i32 = knn_search(q, x, 9, distance)
    assert torch.equal(i16, i32)
    assert torch.equal(d16, d32)


def test_inputs_numpy_and_other_float_dtypes(data):
    q, x = data
    ref = knn_search(q, x, 4)[1]
    assert torch.equal(knn_search(q.numpy(), x.numpy(), 4)[1], ref)
    assert torch.equal(knn_search(q.double().numpy(), x.double(), 4)[1], ref)
    d, i = knn_search(q.half(), x.half(), 4)
    assert torch.equal(i, brute_force(q.half().float(), x.half().float(), 4)[1])
    empty_d, empty_i = knn_search(np.zeros((0, 24), np.float32), x, 4)
    assert empty_d.shape == empty_i.shape == (0, 4)


def test_k_equal_to_database_size_returns_a_full_ranking(data):
    q, x = data
    d, i = knn_search(q[:3], x[:10], 10)
    assert torch.equal(i, brute_force(q[:3], x[:10], 10)[1])


def test_errors(data):
    q, x = data
    with pytest.raises(ConfigError, match="euclidean, cosine"):
        knn_search(q, x, 3, "manhattan")
    with pytest.raises(ConfigError, match="exceeds the 613"):
        knn_search(q, x, 614)
    with pytest.raises(ConfigError, match="positive integer"):
        knn_search(q, x, 0)
    with pytest.raises(ConfigError, match="dimension 24 but the database has 23"):
        knn_search(q, x[:, :23], 3)
    with pytest.raises(ConfigError, match="query_chunk"):
        knn_search(q, x, 3, query_chunk=0)
    with pytest.raises(ConfigError, match="score_dtype"):
        knn_search(q, x, 3, score_dtype=torch.float64)
    bad = x.clone()
    bad[3, 0] = float("nan")
    bad[9, 1] = float("inf")
    with pytest.raises(EmbeddingError, match="2 of 613"):
        knn_search(q, bad, 3)
    with pytest.raises(EmbeddingError, match="too large"):
        knn_search(q, torch.full((5, 24), 1e30), 3)
    with pytest.raises(EmbeddingError, match="2-D"):
        knn_search(q[0], x, 3)
    with pytest.raises(EmbeddingError, match="floating point"):
        knn_search(np.ones((2, 24), dtype=np.int64), x, 3)


def test_automatic_chunks_bound_the_block():
    qc, dc = chunk_sizes(7180, 89996)
    assert (qc, dc) == (2048, 16384)
    qc, dc = chunk_sizes(7180, 12000)
    assert dc == 12000 and qc * dc * 4 <= 128 * 2**20 and qc >= 2048
    qc, dc = chunk_sizes(10000, 5_000_000)
    assert dc < 5_000_000 and qc * dc * 4 <= 128 * 2**20
    assert chunk_sizes(10, 20) == (10, 20)
    assert chunk_sizes(100, 1000, query_chunk=7, db_chunk=9) == (7, 9)


@pytest.mark.parametrize("dim", [2500, 20000])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_wide_vectors_equal_brute_force(distance, dim):
    """Wide vectors (3D concat, raw pixels) are multiplied in pieces: the result stays exact."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(50, dim, generator=g)
    x = torch.randn(300, dim, generator=g)
    x[250] = x[17]  # a duplicated row: the tie goes to the lower index
    q[3] = x[17] + 1e-3
    d, i = knn_search(q, x, 5, distance)
    bd, bi = brute_force(q, x, 5, distance)
    assert torch.equal(i, bi)
    assert torch.allclose(d, bd, rtol=1e-5, atol=1e-5)
    assert i[3, :2].tolist() == [17, 250]


def _integer_ties(n_queries: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer pixel vectors (0-255) at squared distances ~2.9e7 > 2^24 from their query that
    tie exactly (permuted offsets) or differ by 1-9 units: float32 sums cannot order them, the
    int64 reference is exact."""
    rng = np.random.default_rng(seed)
    q = rng.integers(120, 136, (n_queries, dim))
    rows = []
    for query in q:
        offset = rng.integers(-120, 121, dim)
        offset[:8] = 0
        for variant in range(8):  # pairs tie at base + 0, 1, 4, 9
            e = offset.copy()
            if variant % 2:
                e[8:] = rng.permutation(e[8:])
            e[variant] = variant // 2
            rows.append(query + e)
        rows.extend(query + rng.integers(-150, 151, (4, dim)))  # farther rows
    x = np.stack(rows)[rng.permutation(len(rows))]  # ties must resolve by real index
    return torch.from_numpy(q).float(), torch.from_numpy(x).float()


def test_exact_ties_and_near_ties_below_float32_resolution_follow_exact_distances():
    q, x = _integer_ties(6, 6000, seed=5)
    k = 6
    d, i = knn_search(q, x, k)
    exact = ((q.long()[:, None, :] - x.long()[None, :, :]) ** 2).sum(dim=2)  # int64: exact
    order = exact.argsort(dim=1, stable=True)[:, :k]
    assert torch.equal(i, order)
    assert torch.allclose(d.double() ** 2, exact.gather(1, order).double(), rtol=1e-5)
    assert (d[:, 1:] >= d[:, :-1]).all()


def _pixel_embeddings(n: int, split: int) -> torch.Tensor:
    """`model=pixels` embeddings of synthetic 64 px RGB images: 12,288 dims in [0, 1]."""
    from cbmir.data.synthetic import synthetic_images, synthetic_labels

    labels = synthetic_labels("bloodmnist", n, np.random.default_rng(split))
    blocks = synthetic_images("bloodmnist", 64, labels, split_id=split)
    return torch.from_numpy(np.concatenate([b.reshape(len(b), -1) for b in blocks]) / 255.0).float()


def test_wide_pixel_embeddings_are_certified_without_a_second_pass():
    """Raw pixels: norms ~60x the neighbour gaps. A whole-width bound sent most queries to the
    slow exhaustive pass; the piecewise bound certifies them in pass 1."""
    q, x = _pixel_embeddings(40, split=1), _pixel_embeddings(600, split=0)
    db = _Database.build(x, cosine=False, score_dtype=None)
    searcher = _Searcher(db, k=5, db_chunk=600, score_dtype=None)
    queries = _Queries.build(q, _query_norms(q, cosine=False), cosine=False, score_dtype=None)
    _, i = searcher.search(queries, m=21)
    assert searcher.n_uncertified == 0
    assert torch.equal(i, brute_force(q, x, 5)[1])


@pytest.mark.parametrize("dim", [1000, 4096])
def test_database_norm_bound_holds_and_is_tight(dim):
    """max_norm bounds every true ||x|| (the certificate needs it) and, for wide vectors, comes
    from the piecewise ||x||^2 (error gamma_{w+P+2}) rather than an inflation by the whole
    width (2 gamma_{D+2}: 4.9e-4 at 4,096 dims)."""
    g = torch.Generator().manual_seed(9)
    x = torch.rand(200, dim, generator=g) * torch.logspace(-2, 2, 200)[:, None]
    true_max = float(x.double().norm(dim=1).max())
    db = _Database.build(x, cosine=False, score_dtype=None)
    assert db.max_norm >= true_max
    assert db.max_norm <= true_max * (1 + (5e-4 if dim <= GEMM_PIECE else 1e-4))


def test_grouped_selection_keeps_the_smallest_and_nothing_smaller_outside():
    g = torch.Generator().manual_seed(6)
    scores = torch.randint(0, 40, (7, 5000), generator=g).float()  # many ties
    for m in (1, 21, 300):
        values, cols = _smallest(scores.clone(), m)
        assert torch.equal(scores.gather(1, cols), values)
        assert torch.equal(values.sort(dim=1).values, scores.sort(dim=1).values[:, :m])
        outside = torch.ones_like(scores, dtype=torch.bool).scatter_(1, cols, False)
        assert (scores[outside].view(7, -1) >= values.max(dim=1, keepdim=True).values).all()


def test_wide_vectors_re_rank_in_float32_where_piecewise_sums_separate_neighbours():
    """12,288-d neighbours 3e-4 apart (relative): the re-rank sums piece by piece, so their
    rounding intervals (gamma_1038, 6e-5) no longer overlap as the whole-width ones did
    (gamma_12291, 7.3e-4) and no query needs float64 ordering; the order stays exact."""
    dim = 12288
    scale = torch.arange(30, dtype=torch.float64).mul(3e-4).add(1.0)
    values = 100.0 * scale[torch.randperm(30, generator=torch.Generator().manual_seed(8))] / dim
    x = values.sqrt().float()[:, None].expand(30, dim).contiguous()
    q = torch.zeros(2, dim)
    q[1] = 1e-3
    db = _Database.build(x, cosine=False, score_dtype=None)
    searcher = _Searcher(db, k=5, db_chunk=30, score_dtype=None)
    queries = _Queries.build(q, _query_norms(q, cosine=False), cosine=False, score_dtype=None)
    _, i = searcher.search(queries, m=21)
    assert torch.equal(i, brute_force(q, x, 5)[1])
    assert searcher.n_float64 == 0


def test_pass1_option_is_checked_before_any_work(data):
    q, x = data
    with pytest.raises(ConfigError, match="pass1 must be one of"):
        knn_search(q, x, 3, pass1="blas")
    pytest.importorskip("faiss")
    for kwargs in ({"distance": "cosine"}, {"rerank": False}, {"device": "meta"}):
        with pytest.raises(ConfigError, match="pass1='faiss' serves exact euclidean CPU"):
            knn_search(q, x, 3, pass1="faiss", **kwargs)
    wide = torch.randn(4, 1100)
    with pytest.raises(ConfigError, match="<= 1024 dims"):
        knn_search(wide, wide, 2, pass1="faiss")


def test_pieces_multiplied_side_by_side_give_the_same_search():
    """Threads that multiply every n-th GEMM piece (wide vectors on a multi-core CPU) add their
    sums in thread order: the scores are the same on every run and stay within the bound, and
    the certified result equals the one-thread search."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(10)
    q, x = torch.rand(30, 10000, generator=g), torch.rand(400, 10000, generator=g)
    db = _Database.build(x, cosine=False, score_dtype=None)
    queries = _Queries.build(q, _query_norms(q, cosine=False), cosine=False, score_dtype=None)
    serial = _Searcher(db, k=5, db_chunk=400, score_dtype=None)
    with ThreadPoolExecutor(3) as pool:
        threaded = _Searcher(db, k=5, db_chunk=400, score_dtype=None, pool=pool, threads=3)
        assert len(threaded.pieces) == 5  # threads take pieces (0, 3), (1, 4) and (2,)
        scores = threaded.scores(queries, 0, 400, low=False).clone()
        again = threaded.scores(queries, 0, 400, low=False)
        assert torch.equal(scores, again)
        d, i = threaded.search(queries, m=21)
    true = x.double().square().sum(1) - 2 * q.double() @ x.double().T  # ||x||^2 - 2 q.x
    error = serial.score_error(queries, low=False)
    assert ((scores.double() - true).abs() <= error[:, None]).all()
    assert not torch.equal(scores, serial.scores(queries, 0, 400, low=False))  # other sum order
    sd, si = serial.search(queries, m=21)
    assert torch.equal(i, si) and torch.equal(d, sd)
    assert torch.equal(i, brute_force(q, x, 5)[1])


@pytest.mark.parametrize("dim", [5000, 6001])  # pieces of equal width, and a shorter last one
def test_direct_keys_on_the_cpu_lie_within_their_bounds_whatever_the_threads(dim):
    """The CPU re-rank writes x_row - q from the database rows into reused buffers: its keys
    hold the true squared distance inside `key_bounds`, follow `q_rows`, and are the same
    numbers with one thread or several taking runs of queries."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(11)
    q, x = torch.rand(7, dim, generator=g), torch.rand(50, dim, generator=g)
    db = _Database.build(x, cosine=False, score_dtype=None)
    idx = torch.randint(0, 50, (9, 4), generator=g)
    q_rows = torch.tensor([6, 0, 0, 3, 5, 1, 2, 4, 6])
    serial = _Searcher(db, k=2, db_chunk=50, score_dtype=None)
    serial.rerank_bytes = 4 * dim * 3  # three rows per buffer: steps of 3 and 1 per query
    keys = serial.exact_keys(q, idx, q_rows)
    with ThreadPoolExecutor(3) as pool:
        threaded = _Searcher(db, k=2, db_chunk=50, score_dtype=None, pool=pool, threads=3)
        assert torch.equal(threaded.exact_keys(q, idx, q_rows), keys)
    true = (x.double()[idx] - q.double()[q_rows].unsqueeze(1)).square().sum(-1)
    low, high = serial.key_bounds(keys)
    assert ((low <= true) & (true <= high)).all()
    assert keys.dtype == torch.float32 and keys.shape == (9, 4)
    assert len(serial.key_pieces) > len(serial.pieces) > 1  # the re-rank sums narrower pieces


def test_query_norms_on_several_threads_are_the_one_thread_norms():
    """float64 squared query norms computed in runs of rows on pool threads: the same numbers,
    within float64's gamma_D of the sum (the certificate's 1% slack is far wider), and a NaN
    row is still named."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(12)
    q = torch.rand(37, 300000, generator=g)  # rows of 1.2 MB: one row per buffer step
    serial = _query_norms(q, cosine=False)
    with ThreadPoolExecutor(2) as pool:
        threaded = _query_norms(q, cosine=False, pool=pool, threads=2)
        q[30, 5] = float("nan")
        with pytest.raises(EmbeddingError, match="1 of 37 embedding rows contain NaN"):
            _query_norms(q, cosine=False, pool=pool, threads=2)
    assert torch.equal(serial, threaded) and serial.dtype == torch.float64
    exact = q[:30].double().square().sum(1)
    assert ((serial[:30] - exact).abs() <= 2 * 300000 * 2.0**-53 * exact).all()
