"""Bootstrap intervals over queries: contain the estimate, shrink with more queries, cover."""

from __future__ import annotations

import numpy as np
import pytest

from cbmir.retrieval.bootstrap import bootstrap_ci, bootstrap_cis


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.97])
def test_interval_contains_the_point_estimate(p) -> None:
    rng = np.random.default_rng(1)
    for n in (20, 156, 624):
        hits = (rng.random(n) < p).astype(np.float32)
        low, high = bootstrap_ci(hits)
        assert low <= hits.mean() <= high
        assert 0.0 <= low <= high <= 1.0
    ap = rng.beta(2, 1, size=156)  # AP-like continuous values
    low, high = bootstrap_ci(ap)
    assert low < ap.mean() < high


def test_interval_shrinks_with_more_queries() -> None:
    rng = np.random.default_rng(2)
    widths = []
    for n in (156, 1560, 15600):
        low, high = bootstrap_ci((rng.random(n) < 0.8).astype(float))
        widths.append(high - low)
    # ~1/sqrt(n): each tenfold step should cut the width by about 3.2x
    assert widths[1] < widths[0] / 2 and widths[2] < widths[1] / 2
    # 156 BreastMNIST queries at 80%: an interval about 12-13 points wide
    assert 0.10 < widths[0] < 0.16


def test_ninety_five_percent_coverage() -> None:
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(200):
        sample = (rng.random(156) < 0.7).astype(float)
        low, high = bootstrap_ci(sample, seed=trial)
        covered += low <= 0.7 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_many_metrics_share_resamples_and_seeds_repeat() -> None:
    rng = np.random.default_rng(4)
    per_query = {"acc@1": (rng.random(300) < 0.6).astype(float), "map@5": rng.random(300)}
    together = bootstrap_cis(per_query, seed=7)
    for name, values in per_query.items():
        assert together[name] == pytest.approx(bootstrap_ci(values, seed=7))
    assert bootstrap_cis(per_query, seed=7) == together
    assert bootstrap_cis(per_query, seed=8) != together


def test_degenerate_and_bad_input() -> None:
    assert bootstrap_ci(np.ones(50)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="Q > 0"):
        bootstrap_ci(np.array([]))
    with pytest.raises(ValueError, match="one value per query"):
        bootstrap_cis({"a": np.ones(3), "b": np.ones(4)})
