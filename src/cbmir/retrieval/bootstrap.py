"""Bootstrap confidence intervals over queries: how much a metric would move on other queries.

The paper reports no intervals; with 156 BreastMNIST test queries a few points of ACC@1 are
within noise, and the report must show it. Percentile bootstrap of the mean, vectorised: the
same resampled query sets serve every metric (paired), in chunks to bound memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: resampled index rows per chunk are capped at this many elements (int64: 8 MB)
_CHUNK_ELEMENTS = 1_000_000


def bootstrap_means(values: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement) of the rows of `values`.

    `values` is [Q] or [Q, M] (Q queries, M metrics); returns [n_resamples] or [n_resamples, M].
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim not in (1, 2) or data.shape[0] == 0:
        raise ValueError(f"bootstrap needs [Q] or [Q, M] values with Q > 0, got {data.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    n = data.shape[0]
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    means = []
    for start in range(0, n_resamples, rows):
        r = min(rows, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n)) + (np.arange(r) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=r * n).reshape(r, n)  # picks per query
        means.append(counts @ data / n)
    return np.concatenate(means, axis=0)


def bootstrap_ci(
    values: np.ndarray, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean of per-query values."""
    means = bootstrap_means(np.asarray(values).reshape(-1), n_resamples, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_cis(
    per_query: Mapping[str, np.ndarray],
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Intervals for several metrics of the same queries at once (one set of resamples)."""
    names = list(per_query)
    if not names:
        return {}
    columns = [np.asarray(per_query[name], dtype=np.float64).reshape(-1) for name in names]
    if len({len(c) for c in columns}) != 1:
        raise ValueError("every per-query metric must have one value per query")
    means = bootstrap_means(np.stack(columns, axis=1), n_resamples, seed)
    bounds = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return {name: (float(bounds[0, i]), float(bounds[1, i])) for i, name in enumerate(names)}
