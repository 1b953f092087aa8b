"""Is one extractor really better? Paired tests on the same queries, and ranks across datasets.

Within one dataset and size, extractors answer the same test queries, so each comparison is
paired query by query (docs/statistics.md states every assumption):

- paired bootstrap interval of the mean per-query difference (the same resamples for both);
- sign-flip permutation test of "the per-query differences are symmetric around 0", exact
  for up to `EXACT_MAX` queries and Monte-Carlo (`n_permutations` random sign vectors,
  p = (1 + hits) / (1 + n), never 0) beyond;
- Holm's step-down correction across all pairs of one dataset, size and metric.

"Not significantly worse than the best": its Holm-adjusted p against the extractor with the
highest mean is >= alpha. Across datasets, the Friedman test on per-dataset ranks and the
Nemenyi post-hoc test (scipy, scikit-posthocs) give the critical-difference diagram.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cbmir.errors import DataError
from cbmir.retrieval.bootstrap import bootstrap_means

ALPHA = 0.05
EXACT_MAX = 16
"""Up to this many non-zero differences the sign-flip test enumerates all 2^n sign vectors."""
_CHUNK_ELEMENTS = 1_000_000


# -- paired tests on one query set ------------------------------------------------------------
def paired_differences(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x - y per query; both must hold one value per query of the same query set."""
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise DataError(f"paired tests need the same non-empty queries, got {a.size} and {b.size}")
    return a - b


def paired_bootstrap(
    x: np.ndarray, y: np.ndarray, n_resamples: int = 1000, alpha: float = ALPHA, seed: int = 0
) -> tuple[float, float, float]:
    """(mean of x - y, percentile interval low, high): resampling queries keeps pairs together."""
    d = paired_differences(x, y)
    means = bootstrap_means(d, n_resamples, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(d.mean()), float(low), float(high)


def sign_flip_pvalue(
    x: np.ndarray, y: np.ndarray, n_permutations: int = 10_000, seed: int = 0
) -> float:
    """Two-sided p of the mean difference under random sign flips of the per-query differences.

    Exact (all 2^n sign vectors) when at most EXACT_MAX differences are non-zero; otherwise
    Monte-Carlo with the +1 correction, so p >= 1 / (n_permutations + 1) and the test keeps
    its level. Zero differences never change the statistic and are left out.
    """
    d = paired_differences(x, y)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, np.abs(d).sum())  # equal sums up to rounding count as "as extreme"
    if d.size <= EXACT_MAX:
        signs = 1 - 2 * ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // d.size)
    hits = 0
    for start in range(0, n_permutations, rows):
        r = min(rows, n_permutations - start)
        signs = rng.integers(0, 2, size=(r, d.size), dtype=np.int8) * 2 - 1
        hits += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (hits + 1) / (n_permutations + 1)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def pairwise_tests(
    values: Mapping[str, np.ndarray],
    n_resamples: int = 1000,
    n_permutations: int = 10_000,
    alpha: float = ALPHA,
    seed: int = 0,
) -> pd.DataFrame:
    """Every pair (a, b) of `values` (name -> per-query metric): difference a - b, its paired
    bootstrap interval, the sign-flip p and the Holm-adjusted p across these pairs."""
    rows = []
    for a, b in itertools.combinations(values, 2):
        diff, low, high = paired_bootstrap(values[a], values[b], n_resamples, alpha, seed)
        p = sign_flip_pvalue(values[a], values[b], n_permutations, seed)
        rows.append({"a": a, "b": b, "diff": diff, "diff_low": low, "diff_high": high, "p": p})
    table = pd.DataFrame(rows, columns=["a", "b", "diff", "diff_low", "diff_high", "p"])
    table["p_holm"] = holm(table["p"].to_numpy())
    table["significant"] = table["p_holm"] < alpha
    return table


def top_group(
    means: Mapping[str, float], pairs: pd.DataFrame, alpha: float = ALPHA
) -> tuple[list[str], list[str]]:
    """(best, not significantly worse): those with the highest mean (several on an exact tie),
    and every other whose Holm-adjusted p against a best one is >= alpha."""
    top = max(means.values())
    best = [name for name, mean in means.items() if mean == top]
    tied = []
    for name in means:
        if name in best:
            continue
        against = pairs[
            ((pairs["a"] == best[0]) & (pairs["b"] == name))
            | ((pairs["a"] == name) & (pairs["b"] == best[0]))
        ]
        if against.empty or float(against["p_holm"].iloc[0]) >= alpha:
            tied.append(name)
    return best, tied


# -- the per-query results of a job ------------------------------------------------------------
@dataclass(frozen=True)
class QueryResults:
    """A finished job's per-query metrics and what identifies its query set."""

    job: str
    values: dict[str, np.ndarray]
    query_set: tuple[object, ...]
    labels: np.ndarray | None

    def same_queries(self, other: QueryResults) -> bool:
        if self.query_set != other.query_set:
            return False
        if self.labels is None or other.labels is None:
            return True
        return self.labels.shape == other.labels.shape and bool((self.labels == other.labels).all())


def load_query_results(
    job_dir: Path, metrics: Mapping[str, object], query_split: str
) -> QueryResults:
    """`per_query.npz` (metric -> one value per query, in query order) and the query set: the
    data file's sha256, the query split from the config (text runs: their prompts), the query
    count, and the query labels of `neighbors.npz` (older jobs without a sha256 pair on
    labels alone)."""
    path = job_dir / "per_query.npz"
    if not path.is_file():
        raise DataError(f"{job_dir}: no per_query.npz, so its queries cannot be paired")
    with np.load(path) as npz:
        values = {key: np.asarray(npz[key], dtype=np.float64) for key in npz.files}
    labels = None
    neighbours = job_dir / "neighbors.npz"
    if neighbours.is_file():
        with np.load(neighbours) as npz:
            labels = np.asarray(npz["query_labels"]) if "query_labels" in npz.files else None
    query_set = (
        metrics.get("data_sha256"),
        *_queries(metrics, query_split),
        metrics.get("n_queries"),
    )
    return QueryResults(str(job_dir), values, query_set, labels)


def _queries(metrics: Mapping[str, object], query_split: str) -> tuple[str, str]:
    """What the queries were: the query split's images, or a text run's class prompts (its
    `prompts` in metrics.json), so text jobs pair only with text jobs of the very same prompts,
    never with image queries that happen to share their count and labels."""
    if metrics.get("query") == "text":
        return "text", json.dumps(metrics.get("prompts"), sort_keys=True)
    return "image", query_split


def check_pairable(results: Mapping[str, QueryResults]) -> None:
    """DataError unless every job answered the very same queries (matched by index)."""
    items = list(results.items())
    first_name, first = items[0]
    for name, other in items[1:]:
        if not first.same_queries(other):
            raise DataError(
                f"{first.job} ({first_name}) and {other.job} ({name}) did not answer the same "
                f"queries (data sha256, query split, count or labels differ); they cannot be paired"
            )


# -- across datasets ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FriedmanResult:
    """Friedman's test of equal ranks over N datasets (blocks) and k extractors, Nemenyi after."""

    statistic: float
    pvalue: float
    avg_ranks: pd.Series  # extractor -> average rank (1 = best), ascending
    nemenyi: pd.DataFrame  # pairwise p-values, extractors x extractors
    critical_difference: float
    n_datasets: int


def friedman_nemenyi(scores: pd.DataFrame, alpha: float = ALPHA) -> FriedmanResult:
    """`scores`: datasets (rows) x extractors (columns), higher is better, no gaps."""
    import scikit_posthocs as sp
    from scipy import stats

    n, k = scores.shape
    if k < 3 or n < 2 or scores.isna().any().any():
        raise DataError(
            f"Friedman needs >= 3 extractors on >= 2 datasets without gaps, got {k} x {n}"
        )
    statistic, pvalue = stats.friedmanchisquare(*(scores[c].to_numpy() for c in scores.columns))
    ranks = scores.rank(axis=1, ascending=False, method="average").mean(axis=0).sort_values()
    nemenyi = sp.posthoc_nemenyi_friedman(scores.to_numpy())
    nemenyi.index = nemenyi.columns = list(scores.columns)
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    cd = float(q * math.sqrt(k * (k + 1) / (6 * n)))
    return FriedmanResult(float(statistic), float(pvalue), ranks, nemenyi, cd, n)


def complete_block(table: pd.DataFrame, value: str) -> pd.DataFrame:
    """datasets x extractors of `value`: only extractors measured on every dataset (a missing job
    must not tilt the ranks), then only datasets with all of those."""
    wide = table.pivot_table(index="dataset", columns="model_paper", values=value, aggfunc="first")
    wide = wide.dropna(axis=1, how="any") if len(wide) > 1 else wide
    return wide.dropna(axis=0, how="any")
