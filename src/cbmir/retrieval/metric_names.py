"""The names of the configurable retrieval metrics and their rule (`retrieval.metrics`).

Apart from `metric_set` (their torch and torchmetrics code) so that checking a config, the
resolvers and resume's fingerprints need neither: a typo fails before those are imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cbmir.errors import ConfigError

#: the paper's metrics (their ks come from retrieval.k and retrieval.acc_ks)
PAPER_METRICS: tuple[str, ...] = ("map@k", "mmv@k", "acc@k")
EXTRA_METRICS: tuple[str, ...] = (
    "precision@k",
    "recall@k",
    "ndcg@k",
    "mrr",
    "r_precision",
    "map@r",
)
ALL_METRICS: tuple[str, ...] = PAPER_METRICS + EXTRA_METRICS
#: metrics that read R_q neighbours per query (R_q = relevant items in the database)
R_METRICS: tuple[str, ...] = ("r_precision", "map@r")
#: metrics that need R_q (the relevant count), not only the retrieved list
COUNT_METRICS: tuple[str, ...] = ("recall@k", "ndcg@k", *R_METRICS)


def check_metrics(value: Any, key: str = "retrieval.metrics") -> tuple[str, ...]:
    """`all`, or a non-empty list of known metric names (duplicates dropped, order kept)."""
    if value == "all":
        return ALL_METRICS
    names = [value] if isinstance(value, str) else value
    if isinstance(names, bytes) or not isinstance(names, Sequence) or not names:
        raise ConfigError(
            f"{key} must be 'all' or a non-empty list of {', '.join(ALL_METRICS)}; got {value!r}"
        )
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown:
        raise ConfigError(f"unknown {key} {unknown}; choose from {', '.join(ALL_METRICS)} (or all)")
    return tuple(dict.fromkeys(str(n) for n in names))
