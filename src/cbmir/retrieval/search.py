"""Exact k-nearest-neighbour search in blocks, equal to a brute-force loop.

How it stays fast and exact:

1. Pass 1 scores a block of queries against a block of the database with one GEMM
   (``||x||^2 - 2 q.x``, the per-query constant ``||q||^2`` dropped; cosine: ``-cos``), keeps a
   shortlist of ``m > k`` candidates per query and merges shortlists across database blocks.
   Only a [query_chunk, db_chunk] block ever exists, never the full Q x N matrix. On the CPU
   the GEMM runs in numpy's BLAS; vectors wider than GEMM_PIECE are multiplied piece by piece
   so that the rounding-error bound grows with the piece width, not with the full width, and
   with several threads each thread multiplies its own pieces (`_piece_threads`).
   Large exact euclidean CPU searches (FAISS_MIN_ROWS rows, <= FAISS_MAX_DIM dims) take this
   shortlist from faiss' brute force instead when faiss is installed (`pass1`), with a bound
   of its own (`_Searcher.faiss_error`); steps 2 and 3 are the same.
2. The shortlist is re-ranked with float32 distances computed directly (``sum((q - x)^2)``
   summed over pieces of KEY_PIECE columns, cosine ``1 - q^.x^``), gathering only the rows that can
   still be in the top k, a few MB at a time so the arithmetic on them stays in cache (wide
   euclidean vectors on the CPU: each difference straight from the database row into a reused
   buffer, query runs side by side on the piece threads); ties go to the lower database index
   (stable lexicographic sort).
   Where two of the first k + 1 keys are closer than their own rounding error, that query is
   ordered by the same keys in float64 instead, so float32 rounding cannot swap near-ties.
3. A rounding-error bound ``E`` of the GEMM score (derived in `_Searcher.score_error`)
   certifies the result: if the k-th key's upper bound is below the m-th shortlist score minus
   ``E``, nothing outside the shortlist can beat it. The rare uncertified queries (near-ties
   at the shortlist edge, duplicated rows) are searched again over every candidate whose
   score is within ``E`` of that bound.

Half-precision scoring (``score_dtype``, meant for GPUs) uses a larger shortlist and a bound
that assumes float32 accumulation; queries it cannot certify are redone in float32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import threadpoolctl
import torch

from cbmir.errors import ConfigError, EmbeddingError
from cbmir.retrieval.settings import (  # noqa: F401 (DISTANCES: re-export)
    DISTANCES,
    check_distance,
    check_k,
    positive_int,
)

log = logging.getLogger(__name__)

BLOCK_BYTES = 128 * 2**20
"""Target size of one score block; query_chunk/db_chunk are derived from it."""
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_TYPES = (torch.float16, torch.bfloat16)
_U32 = 2.0**-24
GEMM_PIECE = 2048
"""Widest piece of the feature axis multiplied at once (see `_pieces`).

2,048 rather than 1,024: single-threaded OpenBLAS ran 298 x 1,188 x 131,072 in 1,024-column
pieces in 1.09x the CPU time of one whole product, in 2,048-column ones in 1.00x; the wider
pieces double the rounding-error bound, which sent 12 instead of 7 of those 298 queries to
float64 ordering and certified all of them."""
KEY_PIECE = 1024
"""Widest piece of the re-rank's float32 sums (`exact_keys`, `key_bounds`): narrower than the
GEMM's, because the re-rank's cost does not depend on it while its rounding interval, which
decides how many queries are ordered in float64, grows with it."""
FAISS_MAX_DIM = 1024
"""Widest vectors whose pass 1 may come from faiss (see `_pass1_faiss`; measured at 512)."""
RERANK_BYTES_CPU = 4 * 2**20
"""Gathered rows per step of the CPU re-rank: small enough that the subtract, square and sum
passes over them stay in cache (16x fewer bytes than BLOCK_BYTES; on 1,490 gathered rows of
131,072 dims the re-rank took 0.16 CPU s in 4 MB steps against 0.42 in 128 MB ones)."""
SELECT_GROUP = 64
"""Columns per group in the two-stage shortlist selection (see `_smallest`)."""
FAISS_MIN_ROWS = 2**18
"""Database rows from which an exact CPU search takes its pass 1 from faiss (`_faiss_shortlist`).

At 200k x 512 torch and faiss took the same CPU time; at 1M x 512 faiss' flat scan took ~0.7x
torch's (docs/benchmarks.md)."""
PASS1 = ("auto", "torch", "faiss")


def _faiss() -> Any | None:
    """The faiss module if installed (an optional dependency), else None."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _pass1_faiss(
    pass1: str, device: torch.device, exact_l2: bool, dim: int, n_database: int
) -> Any | None:
    """The faiss module where pass 1 is taken from faiss (see FAISS_MIN_ROWS), else None.

    Only exact euclidean CPU searches of at most FAISS_MAX_DIM dims qualify: faiss multiplies
    the whole width at once, so its rounding-error bound (`_Searcher.faiss_error`) would grow
    with wider vectors where the torch pass sums pieces.
    """
    if pass1 not in PASS1:
        raise ConfigError(f"pass1 must be one of {', '.join(PASS1)}, got {pass1!r}")
    if pass1 == "torch":
        return None
    supported = device.type == "cpu" and exact_l2 and dim <= FAISS_MAX_DIM
    if pass1 == "auto":  # import faiss only where it would be used
        return _faiss() if supported and n_database >= FAISS_MIN_ROWS else None
    faiss = _faiss()
    if faiss is None:
        raise ConfigError("pass1='faiss' needs faiss: pip install faiss-cpu (cbmir[faiss])")
    if not supported:
        raise ConfigError(
            f"pass1='faiss' serves exact euclidean CPU searches of <= {FAISS_MAX_DIM} dims "
            "(no score_dtype, rerank=True)"
        )
    return faiss


@contextlib.contextmanager
def _faiss_settings(faiss: Any) -> Iterator[None]:
    """Hold faiss' OpenMP threads to torch's thread count, and its database tile to
    `_faiss_tile_rows`, for one call; both are process-wide in faiss, so both are restored."""
    cvar = faiss.cvar
    threads, tile_rows = faiss.omp_get_max_threads(), cvar.distance_compute_blas_database_bs
    faiss.omp_set_num_threads(torch.get_num_threads())
    cvar.distance_compute_blas_database_bs = _faiss_tile_rows(cvar.distance_compute_blas_query_bs)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)
        cvar.distance_compute_blas_database_bs = tile_rows


def _faiss_tile_rows(query_tile: int) -> int:
    """Database rows per faiss BLAS call in pass 1: as many as fill one BLOCK_BYTES score tile
    with faiss' query tile (8,192 rows for its 4,096 queries), not faiss' default of 1,024.

    faiss multiplies one query tile by one database tile per BLAS call, and BLAS packs the
    query tile anew in every call: 1,024-row tiles repack a 4,096 x 512 query tile once per
    1,024 database rows. The tile changes how the work is cut, not the rounding-error bound:
    each score is still one float32 dot product over the whole width (`faiss_error`). Measured with
    `scripts/bench_faiss.py --tile-rows` (docs/benchmarks.md, "faiss tiles")."""
    return max(1024, BLOCK_BYTES // (4 * max(1, query_tile)))


def _as_matrix(data: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        t = data.detach()
    else:
        arr = np.asarray(data)
        if arr.dtype.kind != "f":
            raise EmbeddingError(f"{name} must be floating point, got numpy dtype {arr.dtype}")
        with warnings.catch_warnings():  # read-only memmaps are fine: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    if t.dtype not in _FLOAT_TYPES:
        raise EmbeddingError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if t.ndim != 2:
        raise EmbeddingError(f"{name} must be a 2-D [rows, dim] matrix, got {tuple(t.shape)}")
    return t


def row_norms(t: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """float32 L2 norm of every row; one fused pass, converting a chunk at a time."""
    if t.shape[0] == 0:
        return torch.zeros(0, device=t.device)
    return torch.cat([torch.linalg.vector_norm(c.float(), dim=1) for c in t.split(chunk)])


def check_finite(t: torch.Tensor, name: str, sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Row norms of `t` (or the given squared norms); EmbeddingError naming how many rows hold
    NaN/Inf or overflow.

    A NaN/Inf element makes its row norm non-finite, so only those rows are inspected.
    """
    norms = row_norms(t) if sq_norms is None else sq_norms
    suspect = ~torch.isfinite(norms)
    if bool(suspect.any()):
        rows = t[suspect.to(t.device)]
        bad = int((~torch.isfinite(rows.float()).all(dim=1)).sum())
        if bad:
            raise EmbeddingError(
                f"{name}: {bad} of {t.shape[0]} embedding rows contain NaN or Inf; "
                "re-extract them (e.g. disable fp16 autocast for this model)"
            )
        raise EmbeddingError(
            f"{name}: {int(suspect.sum())} embedding rows have values too large for float32 "
            "distances (their norm or squared norm overflows); rescale the embeddings"
        )
    return norms


def _query_norms(
    queries: torch.Tensor, cosine: bool, pool: ThreadPoolExecutor | None = None, threads: int = 1
) -> torch.Tensor:
    """What `_Queries.build` needs of every query row, checked finite (`check_finite`) in the
    same pass: float32 norms for cosine, float64 squared norms (`_sq_norms64`, on `threads`
    of `pool` where given) for euclidean.

    A squared norm beyond float32's range is refused as the float32 norm would be: the GEMM's
    products could overflow.
    """
    if cosine:
        return check_finite(queries, "queries")
    sq = _sq_norms64(queries, pool, threads)
    too_large = sq > torch.finfo(torch.float32).max
    check_finite(queries, "queries", sq_norms=torch.where(too_large, math.inf, sq))
    return sq


def _positive_int(value: int | None, name: str) -> int | None:
    return None if value is None else positive_int(value, name)


def chunk_sizes(
    n_queries: int,
    n_database: int,
    query_chunk: int | None = None,
    db_chunk: int | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> tuple[int, int]:
    """Block shape [query_chunk, db_chunk] of about `block_bytes` float32 scores.

    Up to 2048 queries per block: on the 2-core reference CPU, 2048 x 16384 blocks (1024-d)
    took ~12% less CPU time than 372 queries against a whole 90k database and matched one
    full-size GEMM (docs/benchmarks.md).
    """
    elems = max(1, block_bytes // 4)
    q_pref = max(1, min(n_queries, 2048))
    if db_chunk is None:
        db_chunk = n_database if n_database * q_pref <= elems else max(4096, elems // q_pref)
    db_chunk = max(1, min(db_chunk, n_database))
    if query_chunk is None:
        query_chunk = max(1, elems // db_chunk)
    query_chunk = max(1, min(query_chunk, max(n_queries, 1)))
    return query_chunk, db_chunk


def _input_roundoff(device: torch.device, score_dtype: torch.dtype | None) -> float:
    """Unit roundoff of the GEMM inputs: 0 for IEEE float32, more for TF32/bf16/fp16."""
    if score_dtype is torch.float16:
        return 2.0**-11
    if score_dtype is torch.bfloat16:
        return 2.0**-8
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        backend = torch.backends.cuda.matmul
    else:
        backend = getattr(torch.backends.mkldnn, "matmul", None)  # absent in older torch
    mode = str(getattr(backend, "fp32_precision", "none"))
    if precision == "medium" or mode == "bf16":
        return 2.0**-8
    if precision == "high" or mode == "tf32":
        return 2.0**-11
    if device.type == "cuda" and getattr(torch.backends.cuda.matmul, "allow_tf32", False):
        return 2.0**-11
    return 0.0


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error of n chained float32 roundings."""
    return n * _U32 / (1.0 - n * _U32)


def _pieces(dim: int, widest: int = GEMM_PIECE) -> list[slice]:
    """Split of the feature axis into near-equal pieces of at most `widest` columns.

    Summing the GEMM piece by piece bounds the accumulation depth of a score by
    width + pieces instead of `dim`: for 12,288-d pixels 2,054 instead of 12,288, which is what
    lets the rounding-error bound certify wide vectors (see `_Searcher.score_error`). The
    re-rank's sums use their own, narrower pieces (KEY_PIECE).
    """
    count = max(1, math.ceil(dim / widest))
    width = math.ceil(dim / count) if dim else 1
    return [slice(start, min(start + width, dim)) for start in range(0, max(dim, 1), width)]


@functools.cache
def _numpy_gemm() -> bool:
    """Whether CPU GEMMs go through numpy's BLAS (OpenBLAS) instead of torch's (MKL).

    MKL takes a generic code path on non-Intel x86: on the AMD reference CPU numpy's OpenBLAS
    ran the same float32 GEMMs in ~0.6x the CPU time (docs/benchmarks.md). On Intel CPUs MKL
    is kept (not measured here).
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return not ("GenuineIntel" in cpuinfo and torch.backends.mkl.is_available())


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b.T (float32; numpy's BLAS on the CPU where `_numpy_gemm`)."""
    if out.device.type == "cpu" and _numpy_gemm():
        np.matmul(a.numpy(), b.numpy().T, out=out.numpy())
        return out
    return torch.mm(a, b.T, out=out)


def _accumulate(out: torch.Tensor, part: torch.Tensor) -> None:
    """out += part; in numpy on the CPU, where a small torch op right after an OpenBLAS call
    competed with OpenBLAS' spinning threads."""
    if out.device.type == "cpu":
        np.add(out.numpy(), part.numpy(), out=out.numpy())
    else:
        out.add_(part)


@contextlib.contextmanager
def _blas_threads(device: torch.device, threads: int | None = None) -> Iterator[None]:
    """Hold numpy's BLAS to `threads` (default: torch's thread count, torch.set_num_threads
    being the one knob)."""
    if device.type != "cpu":
        yield
        return
    limit = threads or torch.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=limit, user_api="blas"):
        yield


def _piece_threads(device: torch.device, dim: int) -> int:
    """Threads that multiply the GEMM pieces of wide vectors side by side (1: none).

    A piece is a small GEMM (298 x 1,188 x 1,024 for 3D concat features when pieces had 1,024
    columns), and two BLAS threads sharing each one spent 2-3x the CPU time of one thread, worse
    still while other processes ran; one single-threaded BLAS call per thread and piece took 0.55x
    the wall time (`scripts/bench_search.py`, docs/benchmarks.md). Used on the CPU with numpy's BLAS
    (`_numpy_gemm`, whose threads threadpoolctl controls) where every thread gets a piece.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or not _numpy_gemm():
        return 1
    return threads if len(_pieces(dim)) >= threads else 1


def _sorted_by(order_key: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Permutation sorting each row by (order_key, index): ties to the lower database index."""
    by_index = idx.argsort(dim=1)
    by_key = order_key.gather(1, by_index).sort(dim=1, stable=True).indices
    return by_index.gather(1, by_key)


def _lex_topk(dist: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First k by (distance, index)."""
    order = _sorted_by(dist, idx)[:, :k]
    return dist.gather(1, order), idx.gather(1, order)


def _smallest(scores: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m smallest scores per row (unsorted) and their columns; every other score is >= them.

    torch's CPU topk copies and partially sorts every row. Instead take the minimum of each
    group of SELECT_GROUP columns (one vectorised pass), keep the m groups with the smallest
    minima and run topk on those m * SELECT_GROUP columns. Why nothing is lost: the m selected
    minima are m scores <= the m-th group minimum g, so the m-th smallest kept score is <= g, and
    every score of an unselected group is >= its minimum >= g.
    """
    rows, cols = scores.shape
    m = min(m, cols)
    groups = cols // SELECT_GROUP
    if groups <= 2 * m:
        return scores.topk(m, dim=1, largest=False, sorted=False)
    head = scores[:, : groups * SELECT_GROUP].view(rows, groups, SELECT_GROUP)
    best_groups = head.amin(dim=2).topk(m, dim=1, largest=False, sorted=False).indices
    offsets = torch.arange(SELECT_GROUP, device=scores.device)
    columns = (best_groups.unsqueeze(2) * SELECT_GROUP + offsets).view(rows, m * SELECT_GROUP)
    if groups * SELECT_GROUP < cols:  # the ragged tail is always a candidate
        tail = torch.arange(groups * SELECT_GROUP, cols, device=scores.device)
        columns = torch.cat([columns, tail.expand(rows, -1)], dim=1)
    values, pos = scores.gather(1, columns).topk(m, dim=1, largest=False, sorted=False)
    return values, columns.gather(1, pos)


def _sq_norms64(
    t: torch.Tensor, pool: ThreadPoolExecutor | None = None, threads: int = 1
) -> torch.Tensor:
    """float64 squared L2 norm of every row, converting ~1 MB at a time.

    Squares of float32 numbers are exact in float64 and the float64 sum is within gamma_D of
    float64 (D 2^-53: 1.5e-11 relative at 131,072 dims, against the 1% slack the certificate
    allows): used for the query norms in the certificate, where a float32 reduction would be off by
    gamma_D ||q||^2 in float32. On the CPU each step is converted into one reused float64 buffer: a
    fresh 1 MB tensor per step was paged in anew each time (298 rows of 131,072 dims: 0.10-0.29 CPU
    s against 0.05 s). With `pool`, `threads` of its threads take contiguous runs of rows, each with
    its own buffer (every row's sum is the same operations either way).
    """
    rows = max(1, 2**17 // max(1, t.shape[1]))
    if t.device.type != "cpu":
        parts = [torch.linalg.vector_norm(c.double(), dim=1).square() for c in t.split(rows)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=t.device)
    out = np.empty(t.shape[0])

    def norms_of(part: range) -> None:
        buffer = torch.empty((min(rows, len(part)), t.shape[1]), dtype=torch.float64)
        for start in range(part.start, part.stop, rows):
            stop = min(start + rows, part.stop)
            chunk = buffer[: stop - start].copy_(t[start:stop]).numpy()
            out[start:stop] = np.einsum("ij,ij->i", chunk, chunk)

    _split_rows(norms_of, t.shape[0], pool, threads)
    return torch.from_numpy(out)


def _split_rows(
    work: Callable[[range], None], count: int, pool: ThreadPoolExecutor | None, threads: int
) -> None:
    """`work` over rows 0..count: in one call, or on `threads` of `pool`, one contiguous run of
    rows each (a worker's exception is re-raised here)."""
    if pool is None or threads < 2 or count < 2:
        work(range(count))
        return
    bounds = np.linspace(0, count, threads + 1).astype(int)
    list(pool.map(work, [range(bounds[t], bounds[t + 1]) for t in range(threads)]))


def _piecewise_sq_norms(t: torch.Tensor, pieces: list[slice]) -> torch.Tensor:
    """float32 ||x||^2 summed over the GEMM pieces (two or more), so its error is
    gamma_{width + pieces + 2} ||x||^2 like the GEMM's own."""
    rows = max(1, 2**24 // max(1, t.shape[1]))
    width = pieces[0].stop - pieces[0].start
    even = width * len(pieces) == t.shape[1]
    out = torch.zeros(t.shape[0], device=t.device)
    for start in range(0, t.shape[0], rows):
        chunk = t[start : start + rows]
        if even:  # one call over [rows, pieces, width], then the pieces summed in order
            per_piece = torch.linalg.vector_norm(chunk.unflatten(1, (len(pieces), width)), dim=2)
            for j in range(len(pieces)):
                out[start : start + rows] += per_piece[:, j].square()
            continue
        for piece in pieces:
            out[start : start + rows] += torch.linalg.vector_norm(chunk[:, piece], dim=1).square()
    return out


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] along rows; by numpy fancy indexing on the CPU, where torch's index_select of
    131,072-wide rows ran at ~1/12 the speed (8.4 s against 0.67 s for 1,500 rows)."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy()[idx.numpy()])
    return x.index_select(0, idx)


def _take_rows(t: torch.Tensor, rows: torch.Tensor | None, start: int, step: int) -> torch.Tensor:
    """Rows start..start+step of `t`, or of `t[rows]` without copying the rest of `t[rows]`."""
    if rows is None:
        return t[start : start + step]
    return t[rows[start : start + step]]


def _piece_sums(t: Any, pieces: list[slice]) -> Any:
    """Sum over the last axis, piece by piece and then over the pieces (a torch tensor, or a
    numpy array for the CPU re-rank's threads, which must not start torch's own).

    Each term then passes through at most (width - 1) + (pieces - 1) additions, whatever order
    the library sums in: the depth `_Searcher.key_bounds` assumes. One piece: a plain sum.
    """
    if len(pieces) == 1:
        return t.sum(-1)
    width = pieces[0].stop - pieces[0].start
    if width * len(pieces) == t.shape[-1]:
        return t.reshape(*t.shape[:-1], len(pieces), width).sum(-1).sum(-1)
    total = t[..., pieces[0]].sum(-1)
    for piece in pieces[1:]:
        total = total + t[..., piece].sum(-1)
    return total


@dataclass
class _Database:
    """The database on the search device plus the per-row terms every block needs."""

    x: torch.Tensor  # float32 [N, D]
    cosine: bool
    sqn: torch.Tensor | None  # euclidean: ||x||^2 (float32, summed over GEMM pieces)
    neg_inv: torch.Tensor | None  # cosine: -1 / ||x|| (float32 norms, as the exact re-rank uses)
    max_norm: float  # an upper bound on every ||x||
    low: torch.Tensor | None = None  # half-precision copy, scaled by low_scale
    low_scale: float = 1.0

    @classmethod
    def build(cls, x: torch.Tensor, cosine: bool, score_dtype: torch.dtype | None) -> _Database:
        """Checks every row is finite (`check_finite`) and derives the per-row terms."""
        pieces = _pieces(x.shape[1])
        if cosine or len(pieces) == 1:
            norms = check_finite(x, "database")
            # float32 norms are within gamma_{D+2} of the truth: inflate the max to a true bound
            max_norm = float(norms.max()) * (1.0 + 2 * _gamma(x.shape[1] + 2))
            sqn = None if cosine else norms.square()
            neg_inv = -1.0 / norms.clamp_min(1e-30) if cosine else None
        else:  # wide euclidean: one pass over x gives ||x||^2 and, from it, the norm bound
            sqn = _piecewise_sq_norms(x, pieces)
            check_finite(x, "database", sq_norms=sqn)
            # sqn >= (1 - g) ||x||^2 with g = gamma_{width + pieces + 2}; 2u for the sqrt
            depth = max(p.stop - p.start for p in pieces) + len(pieces) + 2
            max_norm = math.sqrt(float(sqn.max()) / (1.0 - _gamma(depth))) * (1.0 + 2 * _U32)
            neg_inv = None
        db = cls(x=x, cosine=cosine, sqn=sqn, neg_inv=neg_inv, max_norm=max_norm)
        if score_dtype is not None:
            # scale so every row has norm <= 1: fp16 cannot overflow, subnormals are bounded
            db.low_scale = 2.0 ** -math.ceil(math.log2(max(max_norm, 1e-30)))
            db.low = (x * db.low_scale).to(score_dtype)
        return db

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Gathered rows [..., D]; cosine rows normalised."""
        gathered = _gather_rows(self.x, idx.reshape(-1)).view(*idx.shape, self.x.shape[1])
        if self.cosine:
            gathered.mul_((-self.neg_inv[idx]).unsqueeze(-1))
        return gathered


@dataclass
class _Queries:
    q: torch.Tensor  # float32 [B, D], normalised for cosine
    sqn: torch.Tensor  # ||q||^2 in float64 (ones for cosine)
    raw: torch.Tensor  # the queries as given (float32), for float64 keys
    low: torch.Tensor | None = None
    low_scale: float = 1.0

    @classmethod
    def build(
        cls, q: torch.Tensor, norms: torch.Tensor, cosine: bool, score_dtype: torch.dtype | None
    ) -> _Queries:
        """`norms`: the float32 row norms (`row_norms`) for cosine, else the float64 squared
        norms (`_sq_norms64`), as `query_norms` computed them."""
        raw = q
        if cosine:
            q = q / norms.clamp_min(1e-30).unsqueeze(1)
            sq = torch.ones(q.shape[0], dtype=torch.float64, device=q.device)
            max_norm = float(norms.max()) if q.shape[0] else 0.0
        else:
            sq = norms.to(q.device, torch.float64)
            max_norm = math.sqrt(float(sq.max())) if q.shape[0] else 0.0
        out = cls(q=q, sqn=sq, raw=raw)
        if score_dtype is not None and q.shape[0]:
            max_norm = max_norm * (1.0 + 2 * _gamma(q.shape[1] + 2))
            out.low_scale = 2.0 ** -math.ceil(math.log2(max(max_norm, 1e-30)))
            out.low = (q * out.low_scale).to(score_dtype)
        return out

    @property
    def count(self) -> int:
        return self.q.shape[0]

    def select(self, rows: torch.Tensor) -> _Queries:
        low = None if self.low is None else self.low[rows]
        return _Queries(self.q[rows], self.sqn[rows], self.raw[rows], low, self.low_scale)


class _Searcher:
    """Blocked exact search of query blocks against one database (module docstring)."""

    def __init__(
        self,
        db: _Database,
        k: int,
        db_chunk: int,
        score_dtype: torch.dtype | None,
        pool: ThreadPoolExecutor | None = None,
        threads: int = 1,
    ) -> None:
        self.db, self.k, self.db_chunk, self.score_dtype = db, k, db_chunk, score_dtype
        # `threads` of `pool` multiply GEMM pieces side by side (`_piece_threads`)
        self.pool, self.threads = (pool, threads) if pool is not None and threads > 1 else (None, 1)
        self.n, self.dim = db.x.shape
        self.device = db.x.device
        self.pieces = _pieces(self.dim)
        self.key_pieces = _pieces(self.dim, KEY_PIECE)  # the re-rank's sums
        self.n_uncertified = 0  # queries pass 1 could not certify (diagnostics, tests)
        self.n_float64 = 0  # queries whose top k held a near-tie resolved in float64
        self._buffers: dict[str, torch.Tensor] = {}  # score blocks, reused across blocks
        self.rerank_bytes = RERANK_BYTES_CPU if self.device.type == "cpu" else BLOCK_BYTES

    def _out(self, rows: int, cols: int, name: str = "scores") -> torch.Tensor:
        """A [rows, cols] view of one reused buffer: no fresh pages to fault in per block."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * cols:
            buf = self._buffers[name] = torch.empty(rows * cols, device=self.device)
        return buf[: rows * cols].view(rows, cols)

    # -- scores ------------------------------------------------------------------------------
    def scores(self, queries: _Queries, start: int, stop: int, low: bool) -> torch.Tensor:
        """Approximate key of every (query, db row in [start, stop)); smaller is nearer.

        Euclidean: ||x||^2 - 2 q.x (= ||q - x||^2 - ||q||^2); cosine: -q^.x / ||x|| (= -cos).
        """
        db = self.db
        if low:
            dots = torch.mm(queries.low, db.low[start:stop].T).float()
            unscale = 1.0 / (queries.low_scale * db.low_scale)
            if db.cosine:
                return dots.mul_(db.neg_inv[start:stop] * unscale)
            return dots.mul_(-2.0 * unscale).add_(db.sqn[start:stop])
        out = self.product(queries.q, db.x[start:stop])
        if db.cosine:
            return out.mul_(db.neg_inv[start:stop])
        # ||x||^2 - 2 q.x in one pass; scaling by -2 is exact, so this equals the product of
        # -2 q without a scaled copy of the queries
        return torch.add(db.sqn[start:stop], out, alpha=-2.0, out=out)

    def product(self, left: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """left @ rows.T summed over the GEMM pieces (`_pieces`), into the reused score buffer.

        With `pool`, each of its threads multiplies every n-th piece with single-threaded BLAS
        into its own sum, and the sums are added in thread order: the result does not depend on
        scheduling, and each term still passes through at most width + pieces roundings (the
        depth `score_error` assumes, for any bracketing of the piece sums).
        """
        out = self._out(left.shape[0], rows.shape[0])
        workers = self.threads
        sums = [out] + [self._out(*out.shape, f"sum{w}") for w in range(1, workers)]
        spare = [self._out(*out.shape, f"piece{w}") for w in range(workers)]

        def add_pieces(w: int) -> None:
            for j, piece in enumerate(self.pieces[w::workers]):
                part = _matmul(left[:, piece], rows[:, piece], sums[w] if j == 0 else spare[w])
                if j:
                    _accumulate(sums[w], part)

        if self.pool is None:
            add_pieces(0)
            return out
        list(self.pool.map(add_pieces, range(workers)))  # re-raises a worker's exception
        for partial in sums[1:]:
            _accumulate(out, partial)
        return out

    def score_error(self, queries: _Queries, low: bool) -> torch.Tensor:
        """Bound E on |approximate key - true key| per query, float64 (see the derivation).

        Derivation (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3; u = 2^-24,
        gamma_n = n u / (1 - n u)). A float32 sum of terms t_j evaluated by any bracketing in
        which each term passes through at most n roundings is off by <= gamma_n sum |t_j|.
        Euclidean score S = fl(||x||^2 + sum_pieces fl((-2 q_p) . x_p)): each product is rounded
        once, a piece of w columns adds <= w - 1 roundings (in whatever order the BLAS sums), the
        P pieces and ||x||^2 are then added (<= P roundings), so n = w + P + 1 <= d := w + P + 2.
        The terms sum to 2 sum|q_i x_i| + ||x||^2 <= 2 |q| M + M^2 (M >= every ||x||). The
        float32 ||x||^2 is itself summed piece by piece (`_piecewise_sq_norms`): another
        gamma_d M^2. GEMM inputs rounded to u_in (TF32/bf16) add 2 u_in |q| M per product. So
        |S - (||q - x||^2 - ||q||^2)| <= (2 gamma_d + 2 u_in)(2 |q| M + M^2) =: E.
        Cosine: S = fl(fl(q^ . x) * fl(-1/||x||)) with q^ and 1/||x|| from float32 norms (each
        within gamma_{D+2} relative) and |q^ . x| / ||x|| <= 1, so
        |S + cos| <= gamma_d + 2 u_in + 2 gamma_{D+3} =: E. ||q||^2 is float64 (`_sq_norms64`)
        and |q| is inflated by 2u; E gets a further 1% for the float64 arithmetic of the
        certificate, whose own rounding is ~1e-16 relative.
        Half-precision scores keep their own, looser bound (inputs scaled, fp16 subnormals).
        """
        width = max(p.stop - p.start for p in self.pieces)
        depth = width + len(self.pieces) + 2
        if low:
            return self._low_score_error(queries)
        u_in = _input_roundoff(self.device, None)
        if self.db.cosine:
            rel = _gamma(depth) + 2 * u_in + 2 * _gamma(self.dim + 3)
            return torch.full_like(queries.sqn, 1.01 * rel)
        rel = 2 * _gamma(depth) + 2 * u_in
        q_norm = queries.sqn.sqrt() * (1.0 + 2 * _U32)
        big_m = self.db.max_norm
        return 1.01 * rel * (2 * q_norm * big_m + big_m**2)

    def faiss_error(self, queries: _Queries) -> torch.Tensor:
        """Bound E on |faiss score - ||q - x||^2| per query, float64 (see `faiss_shortlist`).

        faiss scores S = fl(fl(a + b) - 2 p), clamped at 0, with a = fl(||q||^2) (within
        gamma_D a), b our float32 ||x||^2 (`_Database.sqn`: gamma_{D+3} M^2, one piece) and
        p = fl(q . x) in IEEE float32 BLAS (gamma_D |q| M). Each term passes through at most
        D + 5 roundings and the terms sum to <= (|q| + M)^2, so |S - T| <= gamma_{D+5}
        (|q| + M)^2; clamping only moves S towards T >= 0. Doubled as slack for kernels that
        are not ours (SIMD norms, FMA), 1% for the float64 arithmetic of the certificate.
        """
        q_norm = queries.sqn.sqrt() * (1.0 + 2 * _U32)
        return 2.02 * _gamma(self.dim + 5) * (q_norm + self.db.max_norm) ** 2

    def faiss_shortlist(
        self, faiss: Any, queries: torch.Tensor, m: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1 by faiss' exact brute force (`knn_L2sqr`): the m smallest float32 scores
        ||q - x||^2 per query (all queries at once) and their rows.

        faiss multiplies 4,096-query x `_faiss_tile_rows` tiles and keeps a heap per query; at
        1M x 512 that beat the torch pass (docs/benchmarks.md). It is given our
        ||x||^2, so the bound `faiss_error` holds for the very numbers it adds.
        """
        q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
        x = self.db.x.contiguous().numpy()
        sqn = np.ascontiguousarray(self.db.sqn.numpy(), dtype=np.float32)
        scores = np.empty((q.shape[0], m), dtype=np.float32)
        idx = np.empty((q.shape[0], m), dtype=np.int64)
        ptr = faiss.swig_ptr
        with _faiss_settings(faiss):
            faiss.knn_L2sqr(
                ptr(q), ptr(x), self.dim, q.shape[0], self.n, m, ptr(scores), ptr(idx), ptr(sqn)
            )
        if (idx < 0).any():  # never for a flat scan of finite rows; refuse rather than guess
            raise EmbeddingError("faiss left shortlist slots empty; search with pass1='torch'")
        return torch.from_numpy(scores), torch.from_numpy(idx)

    def _low_score_error(self, queries: _Queries) -> torch.Tensor:
        """Half-precision scores: the earlier worst-case bound (whole-dim accumulation)."""
        u_in = _input_roundoff(self.device, self.score_dtype)
        rel = 2 * u_in + (self.dim + 8) * _U32
        rel += u_in + 4 * math.sqrt(self.dim) * 2.0**-24  # half output, fp16 subnormals
        reduced = {
            torch.float16: "allow_fp16_reduced_precision_reduction",
            torch.bfloat16: "allow_bf16_reduced_precision_reduction",
        }[self.score_dtype]
        if self.device.type == "cuda" and getattr(torch.backends.cuda.matmul, reduced, False):
            rel += 16 * u_in
        if self.db.cosine:
            return torch.full_like(queries.sqn, 16 * rel)
        q_max = float(queries.sqn.max().sqrt())  # inputs were scaled by the chunk-wide max norm
        return torch.full_like(queries.sqn, 4 * rel * (q_max + self.db.max_norm) ** 2)

    # -- exact keys --------------------------------------------------------------------------
    def exact_keys(
        self, q: torch.Tensor, idx: torch.Tensor, q_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Direct float32 key: ||q - x||^2 (euclidean) or 1 - q^.x^ (cosine), [B, m].

        Row b of `idx` belongs to query `q[q_rows[b]]` (default: `q[b]`).

        The euclidean sum runs over pieces (`_piece_sums`, KEY_PIECE), so its rounding interval
        (`key_bounds`) grows with width + pieces, not the full width: at 131,072 dims the
        whole-width interval (7.8e-3 relative) sent most queries to float64 ordering.
        Gathered a few queries at a time, so the [B, m, D] gather stays near `rerank_bytes` and
        the query block itself can be as tall as the GEMM wants (wide vectors: 130-row GEMMs
        took 2.5x the CPU time of 800-row ones).
        """
        if self.device.type == "cpu" and not self.db.cosine and len(self.pieces) > 1:
            return self._euclidean_keys_cpu(q, idx, q_rows)
        step = max(1, self.rerank_bytes // (4 * max(1, idx.shape[1] * self.dim)))
        out = []
        for start in range(0, idx.shape[0], step):
            rows = self.db.rows(idx[start : start + step])
            query = _take_rows(q, q_rows, start, step).unsqueeze(1)
            if self.db.cosine:
                out.append(1.0 - (rows * query).sum(dim=-1))
            else:
                out.append(_piece_sums(rows.sub_(query).square_(), self.key_pieces))
        return torch.cat(out) if len(out) != 1 else out[0]

    def _euclidean_keys_cpu(
        self, q: torch.Tensor, idx: torch.Tensor, q_rows: torch.Tensor | None
    ) -> torch.Tensor:
        """`exact_keys` for wide euclidean vectors on the CPU, without gathering the rows.

        Each difference ``x_row - q`` is written straight from the database row into a small
        reused buffer (numpy, single-threaded per call), squared in place and summed per
        KEY_PIECE piece (`_piece_sums`): no fresh multi-MB gather per query, and with `pool`
        its threads take contiguous runs of query rows, each with its own buffer. Every key is the
        same sequence of operations whatever the thread count, so the reported distances do
        not depend on it. Ad-hoc single-thread timings of 5-6 rows per query (a loaded
        machine, not a script output): 0.83-0.89x the torch gather path's CPU time from 16,384
        to 131,072 dims; 1.1-1.4x at 4,096-8,192 dims, where the per-row calls weigh more (the
        re-rank is a few % of such a search, and runs in parallel here); 1.5-2.2x at 1,024-2,048
        dims, so vectors of one GEMM piece keep the torch path.
        """
        x, queries, rows_of = self.db.x.numpy(), q.numpy(), idx.numpy()
        query_of = None if q_rows is None else q_rows.numpy()
        out = np.empty(rows_of.shape, dtype=np.float32)
        step = max(1, min(rows_of.shape[1], self.rerank_bytes // (4 * max(1, self.dim))))

        def keys_of(part: range) -> None:
            buffer = np.empty((step, self.dim), dtype=np.float32)
            for b in part:
                query = queries[b if query_of is None else query_of[b]]
                for start in range(0, rows_of.shape[1], step):
                    block = rows_of[b, start : start + step]
                    diff = buffer[: len(block)]
                    for j, row in enumerate(block):
                        np.subtract(x[row], query, out=diff[j])
                    np.square(diff, out=diff)
                    out[b, start : start + step] = _piece_sums(diff, self.key_pieces)

        _split_rows(keys_of, rows_of.shape[0], self.pool, self.threads)
        return torch.from_numpy(out)

    def valid_keys(
        self, keys_of: Callable, q: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """`keys_of(q, idx)` (`exact_keys` with `_Queries.q` or `exact_keys64` with
        `_Queries.raw`) where `valid`, inf elsewhere.

        Queries are grouped by their number c of valid candidates and each group gathers just
        its c rows: a block's lists are as wide as its widest query, and on 12,288-d pixels
        gathering every slot read ~3.7x the rows the valid ones need. The group's query rows are
        read step by step inside `keys_of`, not copied out of `q` first (at 131,072 dims that
        copy cost as much as the re-rank).
        """
        counts = valid.sum(dim=1)
        dtype = torch.float64 if keys_of == self.exact_keys64 else torch.float32
        out = torch.full(idx.shape, math.inf, dtype=dtype, device=self.device)
        for count in counts.unique().tolist():
            if count == 0:
                continue
            group = (counts == count).nonzero().squeeze(1)
            mask = valid[group]
            keys = keys_of(q, idx[group][mask].view(-1, count), group)
            part = out[group]
            part[mask] = keys.reshape(-1)
            out[group] = part
        return out

    def exact_keys64(
        self, raw: torch.Tensor, idx: torch.Tensor, q_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The same keys in float64 from the float32 inputs, to order near-ties.

        Differences and squares of float32 numbers are exact in float64; the sum is ~1e-16
        relative (exact for integer data such as raw pixels). Done in pieces of queries to keep
        the [B, m, D] float64 gather near `rerank_bytes`.
        """
        step = max(1, self.rerank_bytes // (8 * max(1, idx.shape[1] * self.dim)))
        out = []
        for start in range(0, idx.shape[0], step):
            rows_idx = idx[start : start + step]
            rows = _gather_rows(self.db.x, rows_idx.reshape(-1)).double()
            rows = rows.view(*rows_idx.shape, self.dim)
            query = _take_rows(raw, q_rows, start, step).double().unsqueeze(1)
            if self.db.cosine:
                inv_norm = 1.0 / rows.norm(dim=-1).clamp_min(1e-300)
                query_unit = query / query.norm(dim=-1, keepdim=True).clamp_min(1e-300)
                out.append(1.0 - (rows * query_unit).sum(dim=-1) * inv_norm)
            else:
                out.append(rows.sub_(query).square_().sum(dim=-1))
        return torch.cat(out) if out else torch.zeros_like(idx, dtype=torch.float64)

    def key_bounds(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 interval [low, high] holding the true key of each float32 exact key.

        Euclidean: sum of D rounded squares of rounded differences, each term off by <= 3
        roundings and the sum by r more (r = w - 1 + P - 1 for P pieces of <= w columns, see
        `_piece_sums`; D - 1 for one piece): K is within gamma_{r+3} T of the true T, so T is in [K
        (1 - g), K / (1 - g)] with g = gamma_{r+4} (one u of slack for the float64 arithmetic here),
        plus D * 2^-126 for squares that underflow. Cosine: both normalisations (gamma_{D+2} each,
        from float32 norms), the product and the sum (gamma_{D+1}) and the final 1 - (u), absolute.
        """
        keys64 = keys.double()
        width = max(p.stop - p.start for p in self.key_pieces)
        sum_roundings = (width - 1) + (len(self.key_pieces) - 1)  # `_piece_sums`; D - 1: one
        if self.db.cosine:
            # 2 (D+2) + (D+1) + 1 <= 3D + 10 roundings in all; 1% for the float64 arithmetic
            band = _gamma(3 * self.dim + 10) * 1.01
            return keys64 - band, keys64 + band
        rel = _gamma(sum_roundings + 4)
        tiny = self.dim * 2.0**-126  # each of the D squares may underflow by < 2^-126
        # K <= T (1 + g) gives T >= K / (1 + g) >= K (1 - g); K >= T (1 - g) gives
        # T <= K / (1 - g) <= K (1 + g (1 + 2g)), as (1 + g + 2g^2)(1 - g) >= 1 for g <= 1/2
        return keys64 * (1 - rel) - tiny, keys64 * (1 + rel * (1 + 2 * rel)) + tiny

    def to_distance(self, exact: torch.Tensor) -> torch.Tensor:
        return exact if self.db.cosine else exact.clamp_min(0).sqrt()

    def to_score_units(self, key: torch.Tensor, queries: _Queries) -> torch.Tensor:
        """A true key (float64) in the units of the approximate score."""
        return key - 1.0 if self.db.cosine else key - queries.sqn

    # -- ranking -----------------------------------------------------------------------------
    def prune(
        self, approx: torch.Tensor, idx: torch.Tensor, error: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shortlist rows that can still be in the top k, nearest first: (indices, valid) [B, w].

        With s_k the k-th smallest score, k rows have a true key <= s_k + E; a row whose score
        exceeds s_k + 2E has a true key > s_k + E, so all k of them beat it. Dropping such rows
        before the re-rank saves gathering most of the shortlist when the bound is tight.
        """
        order = approx.argsort(dim=1)
        approx, idx = approx.gather(1, order), idx.gather(1, order)
        limit = approx[:, self.k - 1].double() + 2 * error
        valid = approx.double() <= limit.unsqueeze(1)  # a prefix of each sorted row
        width = max(self.k, int(valid.sum(dim=1).max()))
        return idx[:, :width], valid[:, :width]

    def rank(
        self, queries: _Queries, keys: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact top k of candidate lists: (float32 keys, indices, upper bound of the k-th key).

        Candidates are sorted by float32 key and index. Where two neighbouring keys among the
        first k + 1 lie within each other's rounding interval (`key_bounds`) the float32 order
        may be wrong, so those queries are ordered by float64 keys instead (ties still to the
        lower index). The float32 keys stay the reported values (bit-identical wherever the
        float32 order was right), made non-decreasing where float64 reordered them. The k-th
        upper bound holds for the true k-th key: k candidates lie below it.
        """
        k = self.k
        keys = torch.where(valid, keys, math.inf)
        order = _sorted_by(keys, idx)
        keys, idx, valid = keys.gather(1, order), idx.gather(1, order), valid.gather(1, order)
        low, high = self.key_bounds(keys)
        kth_upper = high[:, k - 1]
        pairs = min(k, keys.shape[1] - 1)
        uncertain = (high[:, :pairs] >= low[:, 1 : pairs + 1]).any(dim=1).nonzero().squeeze(1)
        if uncertain.numel():
            self.n_float64 += int(uncertain.numel())
            width = int(valid[uncertain].sum(dim=1).max())  # valid entries come first
            sub_idx, sub_valid = idx[uncertain, :width], valid[uncertain, :width]
            keys64 = self.valid_keys(self.exact_keys64, queries.raw[uncertain], sub_idx, sub_valid)
            order = _sorted_by(keys64, sub_idx)[:, :k]
            sub_keys = keys[uncertain, :width].gather(1, order).cummax(dim=1).values
            keys, idx = keys[:, :k].clone(), idx[:, :k].clone()
            keys[uncertain], idx[uncertain] = sub_keys, sub_idx.gather(1, order)
            return keys, idx, kth_upper
        return keys[:, :k].contiguous(), idx[:, :k].contiguous(), kth_upper

    # -- passes ------------------------------------------------------------------------------
    def shortlist(self, queries: _Queries, m: int, low: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1: the m smallest approximate keys per query, merged over database blocks."""
        best_scores = best_idx = None
        for start in range(0, self.n, self.db_chunk):
            stop = min(start + self.db_chunk, self.n)
            block_scores, block_idx = _smallest(self.scores(queries, start, stop, low), m)
            block_idx += start
            if best_scores is None:
                best_scores, best_idx = block_scores, block_idx
                continue
            best_scores = torch.cat([best_scores, block_scores], 1)
            best_idx = torch.cat([best_idx, block_idx], 1)
            if best_scores.shape[1] > m:
                best_scores, pos = best_scores.topk(m, dim=1, largest=False, sorted=False)
                best_idx = best_idx.gather(1, pos)
        return best_scores, best_idx

    def search(
        self,
        queries: _Queries,
        m: int,
        low: bool = False,
        rerank: bool = True,
        given: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices) of one query block; see the module docstring."""
        keys, idx = self.search_keys(queries, m, low, rerank, given)
        return self.to_distance(keys), idx

    def search_keys(
        self,
        queries: _Queries,
        m: int,
        low: bool,
        rerank: bool,
        given: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k exact keys (squared L2 or 1 - cos) and indices, certified by the bound.

        `given`: a pass-1 shortlist from `faiss_shortlist` (scores are whole ||q - x||^2, with
        the bound `faiss_error`); else pass 1 runs here.
        """
        k = self.k
        m = min(max(m, k), self.n)
        if given is not None:
            approx, idx = given
            error, kth_offset = self.faiss_error(queries), torch.zeros_like(queries.sqn)
        else:
            approx, idx = self.shortlist(queries, m, low)
            if not rerank:
                offset = 1.0 if self.db.cosine else queries.sqn.unsqueeze(1).float()
                return _lex_topk(approx + offset, idx, k)
            error = self.score_error(queries, low)
            kth_offset = self.to_score_units(torch.zeros_like(queries.sqn), queries)
        cand, valid = self.prune(approx, idx, error)
        exact = self.valid_keys(self.exact_keys, queries.q, cand, valid)
        keys, top_idx, kth_upper = self.rank(queries, exact, cand, valid)
        if approx.shape[1] == self.n:
            return keys, top_idx
        # Certificate: a row outside the shortlist has approximate score >= the m-th score s_m,
        # so its true key is >= s_m - E; if that exceeds the k-th true key's upper bound, no
        # such row can enter (or tie into) the top k.
        kth_score = kth_upper + kth_offset
        flagged = (kth_score >= approx.max(dim=1).values.double() - error).nonzero().squeeze(1)
        if flagged.numel() == 0:
            return keys, top_idx
        self.n_uncertified += int(flagged.numel())
        sub = queries.select(flagged)
        if low:  # half precision could not certify these: redo them in float32
            sub_keys, sub_idx = self.search_keys(sub, k + max(16, k), low=False, rerank=True)
        else:  # pass 2 in the torch pass' own score units and bound
            kth_torch = self.to_score_units(kth_upper[flagged], sub)
            threshold = kth_torch + self.score_error(sub, low=False)
            sub_keys, sub_idx = self.threshold_search(sub, threshold)
            found = torch.isfinite(sub_keys).all(dim=1)  # always, unless the bound were wrong
            flagged, sub_keys, sub_idx = flagged[found], sub_keys[found], sub_idx[found]
        keys[flagged], top_idx[flagged] = sub_keys, sub_idx
        return keys, top_idx

    def threshold_search(
        self, queries: _Queries, threshold: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 2: exact top k among every row whose approximate score is <= threshold.

        Candidates are ranked by float64 key (then index) and carry their float32 key, so the
        result is exact even among near-ties; lists merge by that same total order.
        """
        n_q, k = queries.count, self.k
        limit = torch.nextafter(threshold.float(), torch.tensor(math.inf, device=self.device))
        best_keys = torch.full((n_q, k), math.inf, device=self.device)
        best_keys64 = torch.full((n_q, k), math.inf, dtype=torch.float64, device=self.device)
        best_idx = torch.full((n_q, k), self.n, dtype=torch.int64, device=self.device)
        budget = max(1, BLOCK_BYTES // (8 * self.dim))  # gathered rows per exact piece
        for start in range(0, self.n, self.db_chunk):
            stop = min(start + self.db_chunk, self.n)
            block = self.scores(queries, start, stop, low=False)
            inside = block <= limit.unsqueeze(1)
            width = int(inside.sum(dim=1).max())
            if width == 0:
                continue
            block_scores, cand = block.topk(width, dim=1, largest=False)
            valid = block_scores <= limit.unsqueeze(1)
            cand += start
            rows = max(1, budget // width)
            cols = max(1, budget // rows)
            for r in range(0, n_q, rows):
                sub = queries.select(torch.arange(r, min(r + rows, n_q), device=self.device))
                for c in range(0, width, cols):
                    piece_idx = cand[r : r + rows, c : c + cols]
                    ok = valid[r : r + rows, c : c + cols]
                    keys = torch.where(ok, self.exact_keys(sub.q, piece_idx), math.inf)
                    keys64 = torch.where(ok, self.exact_keys64(sub.raw, piece_idx), math.inf)
                    merged_idx = torch.cat([best_idx[r : r + rows], piece_idx], 1)
                    order = _sorted_by(
                        torch.cat([best_keys64[r : r + rows], keys64], 1), merged_idx
                    )[:, :k]
                    best_keys64[r : r + rows] = torch.cat(
                        [best_keys64[r : r + rows], keys64], 1
                    ).gather(1, order)
                    best_keys[r : r + rows] = torch.cat([best_keys[r : r + rows], keys], 1).gather(
                        1, order
                    )
                    best_idx[r : r + rows] = merged_idx.gather(1, order)
        self.n_float64 += n_q
        return best_keys.cummax(dim=1).values, best_idx


def knn_search(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor,
    k: int,
    distance: str = "euclidean",
    *,
    query_chunk: int | None = None,
    db_chunk: int | None = None,
    device: str | torch.device | None = None,
    score_dtype: torch.dtype | None = None,
    rerank: bool = True,
    pass1: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN of each query row among the database rows.

    Returns (distances float32 [Q, k], indices int64 [Q, k]) on the CPU, ascending, ties to the
    lower database index. Euclidean distances are true L2; cosine distance is 1 - cos (a zero
    vector has cosine 0 to everything). Work happens on `device` (default: the queries' device)
    in [query_chunk, db_chunk] blocks sized automatically to about 128 MB. `score_dtype`
    (torch.float16 / torch.bfloat16) scores in half precision before the exact re-rank;
    `rerank=False` returns the unverified GEMM-based result (faster, not exact). `pass1`:
    "faiss" takes the shortlist from faiss' exact brute force (euclidean, CPU, <= GEMM_PIECE
    dims; same re-rank, tie rule and certificate), "torch" never, "auto" from FAISS_MIN_ROWS
    database rows when faiss is installed.
    """
    check_distance(distance)
    if score_dtype is not None and score_dtype not in _HALF_TYPES:
        raise ConfigError(
            f"score_dtype must be torch.float16, torch.bfloat16 or None, got {score_dtype}"
        )
    query_rows = _as_matrix(queries, "queries")
    db_rows = _as_matrix(database, "database")
    if query_rows.shape[1] != db_rows.shape[1]:
        raise ConfigError(
            f"queries have dimension {query_rows.shape[1]} but the database has {db_rows.shape[1]}"
        )
    k = check_k(k, n_database=db_rows.shape[0])
    query_chunk = _positive_int(query_chunk, "query_chunk")
    db_chunk = _positive_int(db_chunk, "db_chunk")
    search_device = torch.device(device) if device is not None else query_rows.device
    faiss = _pass1_faiss(
        pass1,
        search_device,
        distance == "euclidean" and score_dtype is None and rerank,
        db_rows.shape[1],
        db_rows.shape[0],
    )
    n_queries, n_database = query_rows.shape[0], db_rows.shape[0]
    out_distances = torch.empty((n_queries, k), dtype=torch.float32)
    out_indices = torch.empty((n_queries, k), dtype=torch.int64)
    cosine = distance == "cosine"
    low = score_dtype is not None
    piece_threads = 1 if low else _piece_threads(search_device, db_rows.shape[1])
    # each piece thread keeps two score blocks: the blocks shrink so the total stays the same
    block_queries, block_rows = chunk_sizes(
        n_queries, n_database, query_chunk, db_chunk, BLOCK_BYTES // piece_threads
    )
    blas_limit = 1 if piece_threads > 1 else None
    with torch.no_grad(), _blas_threads(search_device, blas_limit), contextlib.ExitStack() as stack:
        pool = None
        if piece_threads > 1:
            pool = stack.enter_context(ThreadPoolExecutor(piece_threads, "cbmir-gemm"))
        query_norms = _query_norms(query_rows, cosine, pool, piece_threads)
        db_rows = db_rows.to(search_device, torch.float32)
        if n_queries == 0:
            check_finite(db_rows, "database")
            return out_distances, out_indices
        db = _Database.build(db_rows, cosine, score_dtype)
        searcher = _Searcher(db, k, block_rows, score_dtype, pool, piece_threads)
        # shortlist width of pass 1: k plus a margin for rows the rounding-error bound cannot
        # yet rule out (wider for half-precision scores, whose bound is looser)
        shortlist = k + (max(64, 4 * k) if low else max(16, k))
        given = None
        if faiss is not None:
            m = min(shortlist, n_database)
            given = searcher.faiss_shortlist(faiss, query_rows.to(torch.float32), m)
            log.debug("knn_search: pass 1 by faiss knn_L2sqr (%d database rows)", n_database)
        for start in range(0, n_queries, block_queries):
            block = _Queries.build(
                query_rows[start : start + block_queries].to(search_device, torch.float32),
                query_norms[start : start + block_queries].to(search_device),
                cosine,
                score_dtype,
            )
            block_given = None
            if given is not None:
                block_given = tuple(part[start : start + block_queries] for part in given)
            distances, indices = searcher.search(
                block, shortlist if rerank else k, low=low, rerank=rerank, given=block_given
            )
            out_distances[start : start + block_queries] = distances.cpu()
            out_indices[start : start + block_queries] = indices.cpu()
    if searcher.n_uncertified:
        log.debug(
            "knn_search: %d of %d queries needed the exhaustive second pass",
            searcher.n_uncertified,
            n_queries,
        )
    if searcher.n_float64:
        log.debug("knn_search: %d of %d queries ordered in float64", searcher.n_float64, n_queries)
    return out_distances, out_indices
