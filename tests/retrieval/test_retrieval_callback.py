"""The retrieval stage on stored embeddings: torch and faiss backends agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbmir.retrieval.callback import RetrievalCallback
from cbmir.store import EmbeddingStore

pytest.importorskip("faiss")


def _store(tmp_path) -> EmbeddingStore:
    rng = np.random.default_rng(0)
    store = EmbeddingStore(tmp_path / "store")
    for key, n in (("queries", 40), ("database", 300)):
        labels = rng.integers(0, 3, size=(n, 1))
        values = rng.normal(size=(n, 16)).astype(np.float32) + labels
        writer = store.open_writer(key, n, 16, labels, {})
        writer.write(np.arange(n), values)
        writer.commit()
    return store


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_faiss_flat_backend_equals_exact_torch_and_reuses_its_index(tmp_path, distance) -> None:
    store = _store(tmp_path)
    results = {}
    for backend in ("torch", "faiss"):
        callback = RetrievalCallback(
            store, "queries", "database", tmp_path / backend, k=5, distance=distance,
            backend=backend, faiss={"kind": "flat"},
        )  # fmt: skip
        results[backend] = callback.evaluate()
    torch_nn = np.load(tmp_path / "torch" / "neighbors.npz")["indices"]
    faiss_nn = np.load(tmp_path / "faiss" / "neighbors.npz")["indices"]
    np.testing.assert_array_equal(torch_nn, faiss_nn)
    for name in ("map@5", "mmv@5", "acc@1", "acc@5"):
        assert results["faiss"][name] == pytest.approx(results["torch"][name])
    index = store.entry_dir("database") / f"faiss-flat-{distance}.index"
    assert index.is_file()
    built = index.stat().st_mtime_ns
    RetrievalCallback(
        store, "queries", "database", tmp_path / "again", distance=distance, backend="faiss"
    ).evaluate()
    assert index.stat().st_mtime_ns == built  # reused, not rebuilt
    assert json.loads((tmp_path / "faiss" / "metrics.json").read_text())["backend"] == "faiss"


def test_the_retrieval_config_builds_the_callback(tmp_path) -> None:
    """`cbmir.pipeline` builds the callback with `instantiate(cfg.retrieval, ...)`, less the
    text protocol's keys (`TEXT_QUERY_KEYS`): every setting comes from the config, through the
    same validation as a direct call."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from tests.helpers import compose_config

    from cbmir.retrieval.settings import TEXT_QUERY_KEYS

    cfg = compose_config(["retrieval=cosine", "retrieval.k=3", "+retrieval.search.db_chunk=64"])
    conf = OmegaConf.to_container(cfg.retrieval, resolve=True)
    callback = instantiate(
        {key: value for key, value in conf.items() if key not in TEXT_QUERY_KEYS},
        store=_store(tmp_path),
        query_key="queries",
        database_key="database",
        output_dir=tmp_path / "out",
    )
    assert isinstance(callback, RetrievalCallback)
    settings = callback.settings
    assert (settings.k, settings.distance, settings.acc_ks) == (3, "cosine", (1, 3))
    assert settings.search.kwargs() == {"db_chunk": 64}
    assert callback.evaluate()["map@3"] > 0
