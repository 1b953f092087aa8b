"""Label encoding and the relevance rule shared by every retrieval metric.

Relevance rule (stated once, used everywhere):

- single-label datasets: a retrieved item is relevant when it has the query's class;
- multi-label datasets (ChestMNIST, N x L binary): relevant when query and item share at least
  one positive label, **or both have no positive label at all** (two "no finding" images count
  as relevant to each other; without this rule such queries could never be answered correctly).

Both cases reduce to "the multi-hot rows intersect": single-label ids become one-hot rows, and
multi-label rows get one extra column that is set exactly when a row has no positive label.
"""

from __future__ import annotations

import numpy as np
import torch

from cbmir.errors import ConfigError, DataError

LabelsLike = np.ndarray | torch.Tensor


def _as_tensor(labels: LabelsLike) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu()
    return torch.from_numpy(np.asarray(labels))


def is_multilabel(labels: LabelsLike) -> bool:
    """True for N x L label arrays with L > 1 (one binary column per label)."""
    return labels.ndim == 2 and labels.shape[1] > 1


def to_multihot(
    labels: LabelsLike, num_classes: int | None = None, multilabel: bool | None = None
) -> torch.Tensor:
    """Encode labels as a bool matrix whose rows intersect exactly when items are relevant.

    Single-label (N or N x 1 integer ids) -> one-hot [N, C] with C = `num_classes` or max id + 1.
    Multi-label (N x L binary) -> [N, L + 1]; the last column marks "no positive label".
    `multilabel=None` detects multi-label as 2-D with L > 1; for multi-label, `num_classes` is L.
    """
    t = _as_tensor(labels)
    multi = is_multilabel(t) if multilabel is None else bool(multilabel)
    if multi:
        return _multilabel_to_multihot(t, num_classes)
    return _single_to_onehot(t, num_classes)


def _single_to_onehot(t: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise DataError(
            f"single-label labels must have shape N or N x 1, got {tuple(t.shape)}; "
            "pass multilabel=True for N x L binary labels"
        )
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise DataError("single-label labels must be integer class ids, got fractions")
    elif t.dtype == torch.bool:
        t = t.to(torch.int64)
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise DataError(f"class ids must be >= 0, got {int(t.min())}")
    top = int(t.max()) + 1 if t.numel() else 0
    n_cls = top if num_classes is None else int(num_classes)
    if top > n_cls:
        raise DataError(f"class id {top - 1} is out of range for num_classes={n_cls}")
    out = torch.zeros((t.shape[0], max(n_cls, 1)), dtype=torch.bool)
    out[torch.arange(t.shape[0]), t] = True
    return out


def _multilabel_to_multihot(t: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise DataError(f"multi-label labels must have shape N x L, got {tuple(t.shape)}")
    if num_classes is not None and int(num_classes) != t.shape[1]:
        raise DataError(f"multi-label labels have {t.shape[1]} columns, expected {num_classes}")
    if t.numel() and not bool(((t == 0) | (t == 1)).all()):
        raise DataError("multi-label labels must be binary (0/1) per column")
    pos = t != 0
    none = ~pos.any(dim=1, keepdim=True)
    return torch.cat([pos, none], dim=1)


def encode_pair(
    query_labels: LabelsLike, db_labels: LabelsLike, multilabel: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot encode query and database labels with one shared column layout."""
    q, d = _as_tensor(query_labels), _as_tensor(db_labels)
    mq = is_multilabel(q) if multilabel is None else multilabel
    md = is_multilabel(d) if multilabel is None else multilabel
    if mq != md:
        raise ConfigError(
            f"query labels {tuple(q.shape)} and database labels {tuple(d.shape)} "
            "are not both single-label or both multi-label"
        )
    if mq:
        if q.ndim == 2 and d.ndim == 2 and q.shape[1] != d.shape[1]:
            raise ConfigError(
                f"query labels have {q.shape[1]} label columns, database labels {d.shape[1]}"
            )
        return to_multihot(q, multilabel=True), to_multihot(d, multilabel=True)
    n_cls = 0
    for t in (q, d):
        if t.numel():
            n_cls = max(n_cls, int(t.max()) + 1)
    return (
        to_multihot(q, num_classes=n_cls, multilabel=False),
        to_multihot(d, num_classes=n_cls, multilabel=False),
    )


def relevance(query_multihot: torch.Tensor, neighbor_multihot: torch.Tensor) -> torch.Tensor:
    """rel[q, j] = neighbour j of query q shares a column with the query ([Q, C], [Q, k, C])."""
    return (query_multihot[:, None, :] & neighbor_multihot).any(dim=-1)
