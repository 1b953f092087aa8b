"""Label rows -> words, and which neighbours count as hits (the metrics' relevance rule)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NO_LABEL = "no positive label"


def label_text(label: np.ndarray, names: Mapping[int, str], multilabel: bool) -> str:
    """A label row as words: the class name, or the positive labels joined for multi-label."""
    row = np.asarray(label).reshape(-1)
    if multilabel:
        positive = [names.get(int(i), str(int(i))) for i in np.flatnonzero(row)]
        return ", ".join(positive) if positive else NO_LABEL
    value = int(row[0])
    return names.get(value, str(value))


def relevance(
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    indices: np.ndarray,
    multilabel: bool,
) -> np.ndarray:
    """bool [Q, k]: neighbour j of query i is relevant, by the same rule as the metrics.

    Same class for single-label sets; for multi-label, a shared positive label or both
    without any (`cbmir.retrieval.labels`).
    """
    from cbmir.retrieval.labels import to_multihot

    q = np.asarray(query_labels).reshape(len(query_labels), -1)
    db = np.asarray(database_labels).reshape(len(database_labels), -1)
    width = db.shape[1] if multilabel else int(max(q.max(initial=0), db.max(initial=0))) + 1
    q_hot = to_multihot(q, width, multilabel=multilabel).numpy()
    db_hot = to_multihot(db, width, multilabel=multilabel).numpy()
    idx = np.asarray(indices)
    return (q_hot[:, None, :] & db_hot[idx]).any(axis=-1)


def names_from_config(
    data_cfg: Mapping[str, Any],
    labels: np.ndarray | None = None,
    source_sha256: str | None = None,
) -> dict:
    """Label names of a run's dataset without decoding anything.

    MedMNIST flags read `INFO[flag]['label']`; a custom npz uses `data.label_names` when given;
    an own collection (`data=folder|csv`) the names its decoded cache recorded, when that cache
    is current and holds the very arrays the embeddings came from (`source_sha256`, the store
    entry's data identity); else the class ids (or column numbers for multi-label) as text.
    """
    from cbmir.data import catalog

    flag = data_cfg.get("flag")
    if flag:
        return catalog.label_names(str(flag))
    given = data_cfg.get("label_names")
    if given:
        return catalog.name_map(given)
    if str(data_cfg.get("_target_", "")).endswith("CollectionDataModule"):
        recorded = _collection_names(data_cfg, source_sha256)
        if recorded is not None:
            return recorded
    if labels is None:
        return {}
    arr = np.asarray(labels).reshape(len(labels), -1)
    n = arr.shape[1] if arr.shape[1] > 1 else int(arr.max(initial=0)) + 1
    return {i: str(i) for i in range(n)}


def _collection_names(data_cfg: Mapping[str, Any], source_sha256: str | None) -> dict | None:
    """{id: name} from a collection's decoded cache; None (with a warning) when the files are
    gone or changed since, or the cache holds other arrays than `source_sha256` names: ids are
    shown then, never names of another decode."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cbmir.errors import CbmirError

    try:
        datamodule = instantiate(OmegaConf.create(dict(data_cfg)))
        manifest = datamodule.current_manifest()
    except CbmirError as exc:
        log.warning("label names of %s not read (%s); showing class ids", data_cfg.get("path"), exc)
        return None
    if manifest is None or manifest["source"]["sha256"] != source_sha256:
        log.warning(
            "the decoded cache of %s is not the one the embeddings came from (files changed or "
            "not decoded); showing class ids",
            data_cfg.get("path"),
        )
        return None
    return dict(enumerate(manifest["label_names"]))
