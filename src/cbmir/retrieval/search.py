"""Exact k-nearest-neighbour search in blocks, equal to a brute-force loop.

How it stays fast and exact:

1. Pass 1 scores a block of queries against a block of the database with one GEMM
   (``||x||^2 - 2 q.x``, the per-query constant ``||q||^2`` dropped; cosine: ``-cos``), keeps a
   shortlist of ``m > k`` candidates per query and merges shortlists across database blocks.
   Only a [query_chunk, db_chunk] block ever exists, never the full Q x N matrix.
2. The shortlist is re-ranked with float32 distances computed directly (``sum((q - x)^2)``,
   cosine ``1 - q^.x^``); ties go to the lower database index (stable lexicographic sort).
3. A rounding-error bound ``B`` of the GEMM score certifies the result: if the k-th exact key is
   below the m-th shortlist score minus ``B``, nothing outside the shortlist can beat it. The
   rare uncertified queries (near-ties at the shortlist edge, duplicated rows) are searched
   again over every candidate whose score is within ``B`` of the k-th key.

Half-precision scoring (``score_dtype``, meant for GPUs) uses a larger shortlist and a bound
that assumes float32 accumulation; queries it cannot certify are redone in float32.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from cbmir.errors import ConfigError, EmbeddingError
from cbmir.retrieval.settings import DISTANCES, check_distance, check_k  # noqa: F401 (re-export)

log = logging.getLogger(__name__)

BLOCK_BYTES = 128 * 2**20
"""Target size of one score block; query_chunk/db_chunk are derived from it."""
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_TYPES = (torch.float16, torch.bfloat16)
_U32 = 2.0**-24


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


def check_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """Row norms of `t`; EmbeddingError naming how many rows hold NaN/Inf.

    A NaN/Inf element makes its row norm non-finite, so only those rows are inspected.
    """
    norms = row_norms(t)
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
            "distances (their norm overflows); rescale the embeddings"
        )
    return norms


def _positive_int(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


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


def _lex_topk(dist: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First k by (distance, index): sort by index, then stable sort by distance."""
    order = idx.argsort(dim=1)
    idx = idx.gather(1, order)
    dist = dist.gather(1, order)
    order = dist.sort(dim=1, stable=True).indices[:, :k]
    return dist.gather(1, order), idx.gather(1, order)


@dataclass
class _Database:
    """The database on the search device plus the per-row terms every block needs."""

    x: torch.Tensor  # float32 [N, D]
    cosine: bool
    sqn: torch.Tensor | None  # euclidean: ||x||^2
    neg_inv: torch.Tensor | None  # cosine: -1 / ||x||
    max_norm: float
    low: torch.Tensor | None = None  # half-precision copy, scaled by low_scale
    low_scale: float = 1.0

    @classmethod
    def build(
        cls, x: torch.Tensor, norms: torch.Tensor, cosine: bool, score_dtype: torch.dtype | None
    ) -> _Database:
        max_norm = float(norms.max())
        db = cls(
            x=x,
            cosine=cosine,
            sqn=None if cosine else norms.square(),
            neg_inv=-1.0 / norms.clamp_min(1e-30) if cosine else None,
            max_norm=max_norm,
        )
        if score_dtype is not None:
            # scale so every row has norm <= 1: fp16 cannot overflow, subnormals are bounded
            db.low_scale = 2.0 ** -math.ceil(math.log2(max(max_norm, 1e-30)))
            db.low = (x * db.low_scale).to(score_dtype)
        return db

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Gathered rows [..., D]; cosine rows normalised."""
        g = self.x.index_select(0, idx.reshape(-1)).view(*idx.shape, self.x.shape[1])
        if self.cosine:
            g.mul_((-self.neg_inv[idx]).unsqueeze(-1))
        return g


@dataclass
class _Queries:
    q: torch.Tensor  # float32 [B, D], normalised for cosine
    sqn: torch.Tensor  # ||q||^2 (ones for cosine)
    low: torch.Tensor | None = None
    low_scale: float = 1.0

    @classmethod
    def build(
        cls, q: torch.Tensor, norms: torch.Tensor, cosine: bool, score_dtype: torch.dtype | None
    ) -> _Queries:
        if cosine:
            q = q / norms.clamp_min(1e-30).unsqueeze(1)
            norms = torch.ones_like(norms)
        sq = norms.square()
        out = cls(q=q, sqn=sq)
        if score_dtype is not None and q.shape[0]:
            max_norm = float(sq.max().sqrt())
            out.low_scale = 2.0 ** -math.ceil(math.log2(max(max_norm, 1e-30)))
            out.low = (q * out.low_scale).to(score_dtype)
        return out

    def select(self, rows: torch.Tensor) -> _Queries:
        low = None if self.low is None else self.low[rows]
        return _Queries(self.q[rows], self.sqn[rows], low, self.low_scale)


class _Searcher:
    def __init__(
        self, db: _Database, k: int, db_chunk: int, score_dtype: torch.dtype | None
    ) -> None:
        self.db, self.k, self.db_chunk, self.score_dtype = db, k, db_chunk, score_dtype
        self.n, self.dim = db.x.shape
        self.device = db.x.device
        self.n_uncertified = 0  # queries pass 1 could not certify (diagnostics, tests)
        self._buf: torch.Tensor | None = None  # score block storage, reused across blocks

    def _out(self, rows: int, cols: int) -> torch.Tensor:
        """A [rows, cols] view of one reused buffer: no fresh pages to fault in per block."""
        if self._buf is None or self._buf.numel() < rows * cols:
            self._buf = torch.empty(rows * cols, device=self.device)
        return self._buf[: rows * cols].view(rows, cols)

    # -- scores and bounds -------------------------------------------------------------------
    def scores(self, qs: _Queries, a: int, b: int, low: bool) -> torch.Tensor:
        """Approximate key of every (query, db row in [a, b)); smaller is nearer."""
        db = self.db
        if low:
            dots = torch.mm(qs.low, db.low[a:b].T).float()
            unscale = 1.0 / (qs.low_scale * db.low_scale)
            if db.cosine:
                return dots.mul_(db.neg_inv[a:b] * unscale)
            return dots.mul_(-2.0 * unscale).add_(db.sqn[a:b])
        out = self._out(qs.q.shape[0], b - a)
        if db.cosine:
            return torch.mm(qs.q, db.x[a:b].T, out=out).mul_(db.neg_inv[a:b])
        return torch.addmm(
            db.sqn[a:b].unsqueeze(0), qs.q, db.x[a:b].T, beta=1.0, alpha=-2.0, out=out
        )

    def bound(self, qs: _Queries, low: bool) -> torch.Tensor:
        """Upper bound on |approximate key - exact key| (incl. re-rank rounding), per query."""
        u_in = _input_roundoff(self.device, self.score_dtype if low else None)
        rel = 2 * u_in + (self.dim + 8) * _U32
        if low:
            rel += u_in + 4 * math.sqrt(self.dim) * 2.0**-24  # half output, fp16 subnormals
            reduced = {
                torch.float16: "allow_fp16_reduced_precision_reduction",
                torch.bfloat16: "allow_bf16_reduced_precision_reduction",
            }[self.score_dtype]
            if self.device.type == "cuda" and getattr(torch.backends.cuda.matmul, reduced, False):
                rel += 16 * u_in
        if self.db.cosine:
            return torch.full_like(qs.sqn, 16 * rel)
        if low:  # inputs were scaled by the chunk-wide max norm
            return torch.full_like(
                qs.sqn, 4 * rel * (float(qs.sqn.max().sqrt()) + self.db.max_norm) ** 2
            )
        return 4 * rel * (qs.sqn.sqrt() + self.db.max_norm) ** 2

    # -- exact distances ---------------------------------------------------------------------
    def exact_keys(self, qs: _Queries, idx: torch.Tensor) -> torch.Tensor:
        """Direct float32 key: ||q - x||^2 (euclidean) or 1 - q^.x^ (cosine), [B, m]."""
        g = self.db.rows(idx)
        if self.db.cosine:
            return 1.0 - (g * qs.q.unsqueeze(1)).sum(dim=-1)
        g.sub_(qs.q.unsqueeze(1))
        return g.square_().sum(dim=-1)

    def key_from_exact(self, exact: torch.Tensor, qs: _Queries) -> torch.Tensor:
        """Exact key in the units of the approximate score (to compare with it)."""
        return exact - 1.0 if self.db.cosine else exact - qs.sqn.unsqueeze(1)

    def to_distance(self, exact: torch.Tensor) -> torch.Tensor:
        return exact if self.db.cosine else exact.clamp_min(0).sqrt()

    # -- passes ------------------------------------------------------------------------------
    def shortlist(self, qs: _Queries, m: int, low: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1: the m smallest approximate keys per query, merged over database blocks."""
        vals = idx = None
        for a in range(0, self.n, self.db_chunk):
            b = min(a + self.db_chunk, self.n)
            s = self.scores(qs, a, b, low)
            v, i = s.topk(min(m, b - a), dim=1, largest=False, sorted=False)
            del s
            i += a
            if vals is None:
                vals, idx = v, i
            else:
                vals, idx = torch.cat([vals, v], 1), torch.cat([idx, i], 1)
                if vals.shape[1] > m:
                    vals, pos = vals.topk(m, dim=1, largest=False, sorted=False)
                    idx = idx.gather(1, pos)
        return vals, idx

    def search(
        self, qs: _Queries, m: int, low: bool = False, rerank: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices) of one query block; see the module docstring."""
        keys, idx = self.search_keys(qs, m, low, rerank)
        return self.to_distance(keys), idx

    def search_keys(
        self, qs: _Queries, m: int, low: bool, rerank: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k exact keys (squared L2 or 1 - cos) and indices, certified by the bound."""
        k = self.k
        m = min(max(m, k), self.n)
        vals, idx = self.shortlist(qs, m, low)
        if not rerank:
            approx = vals + (1.0 if self.db.cosine else qs.sqn.unsqueeze(1))
            return _lex_topk(approx, idx, k)
        exact, idx = _lex_topk(self.exact_keys(qs, idx), idx, m)
        d, i = exact[:, :k].contiguous(), idx[:, :k].contiguous()
        if m == self.n:
            return d, i
        key_k = self.key_from_exact(d[:, k - 1 :], qs).squeeze(1)
        bound = self.bound(qs, low)
        flagged = (key_k >= vals.max(dim=1).values - bound).nonzero().squeeze(1)
        if flagged.numel() == 0:
            return d, i
        self.n_uncertified += int(flagged.numel())
        sub = qs.select(flagged)
        if low:  # half precision could not certify these: redo them in float32
            fd, fi = self.search_keys(sub, k + max(16, k), low=False, rerank=True)
            d[flagged], i[flagged] = fd, fi
        else:
            fd, fi = self.threshold_search(sub, key_k[flagged] + bound[flagged])
            ok = torch.isfinite(fd).all(dim=1)
            d[flagged[ok]], i[flagged[ok]] = fd[ok], fi[ok]
        return d, i

    def threshold_search(
        self, qs: _Queries, thr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 2: exact re-rank of every candidate whose approximate key is <= thr."""
        n_q, k = qs.q.shape[0], self.k
        best_d = torch.full((n_q, k), math.inf, device=self.device)
        best_i = torch.full((n_q, k), self.n, dtype=torch.int64, device=self.device)
        budget = max(1, BLOCK_BYTES // (4 * self.dim))  # gathered rows per exact piece
        for a in range(0, self.n, self.db_chunk):
            b = min(a + self.db_chunk, self.n)
            s = self.scores(qs, a, b, low=False)
            width = int((s <= thr.unsqueeze(1)).sum(dim=1).max())
            if width == 0:
                continue
            v, cand = s.topk(width, dim=1, largest=False)
            del s
            valid = v <= thr.unsqueeze(1)
            cand += a
            rows = max(1, budget // width)
            cols = max(1, budget // rows)
            for r in range(0, n_q, rows):
                sub = qs.select(torch.arange(r, min(r + rows, n_q), device=self.device))
                for c in range(0, width, cols):
                    ci = cand[r : r + rows, c : c + cols]
                    e = self.exact_keys(sub, ci)
                    e = torch.where(valid[r : r + rows, c : c + cols], e, math.inf)
                    best_d[r : r + rows], best_i[r : r + rows] = _lex_topk(
                        torch.cat([best_d[r : r + rows], e], 1),
                        torch.cat([best_i[r : r + rows], ci], 1),
                        k,
                    )
        return best_d, best_i


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN of each query row among the database rows.

    Returns (distances float32 [Q, k], indices int64 [Q, k]) on the CPU, ascending, ties to the
    lower database index. Euclidean distances are true L2; cosine distance is 1 - cos (a zero
    vector has cosine 0 to everything). Work happens on `device` (default: the queries' device)
    in [query_chunk, db_chunk] blocks sized automatically to about 128 MB. `score_dtype`
    (torch.float16 / torch.bfloat16) scores in half precision before the exact re-rank;
    `rerank=False` returns the unverified GEMM-based result (faster, not exact).
    """
    check_distance(distance)
    if score_dtype is not None and score_dtype not in _HALF_TYPES:
        raise ConfigError(
            f"score_dtype must be torch.float16, torch.bfloat16 or None, got {score_dtype}"
        )
    q = _as_matrix(queries, "queries")
    x = _as_matrix(database, "database")
    if q.shape[1] != x.shape[1]:
        raise ConfigError(f"queries have dimension {q.shape[1]} but the database has {x.shape[1]}")
    k = check_k(k, n_database=x.shape[0])
    query_chunk = _positive_int(query_chunk, "query_chunk")
    db_chunk = _positive_int(db_chunk, "db_chunk")
    q_norms = check_finite(q, "queries")

    dev = torch.device(device) if device is not None else q.device
    n_q, n = q.shape[0], x.shape[0]
    out_d = torch.empty((n_q, k), dtype=torch.float32)
    out_i = torch.empty((n_q, k), dtype=torch.int64)
    cosine = distance == "cosine"
    qc, dc = chunk_sizes(n_q, n, query_chunk, db_chunk)
    low = score_dtype is not None
    with torch.no_grad():
        x = x.to(dev, torch.float32)
        x_norms = check_finite(x, "database")
        if n_q == 0:
            return out_d, out_i
        db = _Database.build(x, x_norms, cosine, score_dtype)
        searcher = _Searcher(db, k, dc, score_dtype)
        m = k + (max(64, 4 * k) if low else max(16, k))
        if query_chunk is None:  # the exact re-rank gathers qc x m x D floats: bound it too
            qc = max(1, min(qc, BLOCK_BYTES // (4 * m * max(1, q.shape[1]))))
        for s in range(0, n_q, qc):
            qs = _Queries.build(
                q[s : s + qc].to(dev, torch.float32),
                q_norms[s : s + qc].to(dev),
                cosine,
                score_dtype,
            )
            d, i = searcher.search(qs, m if rerank else k, low=low, rerank=rerank)
            out_d[s : s + qc] = d.cpu()
            out_i[s : s + qc] = i.cpu()
    if searcher.n_uncertified:
        log.debug(
            "knn_search: %d of %d queries needed the exhaustive second pass",
            searcher.n_uncertified,
            n_q,
        )
    return out_d, out_i
