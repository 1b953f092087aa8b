"""The database a query searches: a stored embedding entry, its images, and its extractor.

Sources, in the order they are tried:

- a finished run's output directory (`config_resolved.yaml` + `metrics.json` naming the store
  entries): the run's own config rebuilds the extractor and the DataModule;
- an explicit store entry directory (`manifest.json` + `embeddings.npy`) with a config composed
  from Hydra overrides (`data=... model=...`), checked against the entry's manifest;
- Hydra overrides alone: the entry is found in the store by its content key.

The database is never re-embedded: if the entry is missing, that is an error. Before any
query is embedded, the rebuilt extractor's identity must equal the one the entry was built with,
and the DataModule's data identity must equal the entry's (else its pictures would not be the
rows that were embedded).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from cbmir.config import unlink_embedder_mirrors
from cbmir.errors import ConfigError, DataError
from cbmir.store import EmbeddingStore, StoredEmbeddings, canonical_json

if TYPE_CHECKING:
    from cbmir.query.inputs import ItemSpec

RUN_CONFIG = "config_resolved.yaml"
RUN_METRICS = "metrics.json"


@dataclass
class Database:
    """An opened database: its config, DataModule, split and (once checked) store entry."""

    cfg: DictConfig
    datamodule: Any
    split: str
    entry: StoredEmbeddings | None
    run_dir: Path | None = None

    @property
    def spec(self) -> ItemSpec:
        from cbmir.query.inputs import spec_of  # torch: only once a query is read

        return spec_of(self.datamodule.image_shape, self.datamodule.is_volume)

    @property
    def label_names(self) -> dict[int, str]:
        return self.datamodule.label_names

    @property
    def multilabel(self) -> bool:
        return bool(self.datamodule.multilabel)


def _plain(obj: Any) -> Any:
    """JSON round trip, as the manifest stored it (tuples -> lists, objects -> str)."""
    return json.loads(json.dumps(obj, default=str))


def _differences(expected: dict[str, Any], found: dict[str, Any]) -> str:
    keys = sorted(set(expected) | set(found))
    parts = [
        f"{key}: {expected.get(key, '(absent)')!r} vs {found.get(key, '(absent)')!r}"
        for key in keys
        if canonical_json(expected.get(key)) != canonical_json(found.get(key))
    ]
    return "; ".join(parts[:6]) + (" ..." if len(parts) > 6 else "")


def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> tuple[DictConfig, dict]:
    """A finished run's resolved config (with `key.path=value` overrides) and its metrics."""
    run_dir = Path(run_dir)
    missing = [name for name in (RUN_CONFIG, RUN_METRICS) if not (run_dir / name).is_file()]
    if missing:
        raise DataError(
            f"{run_dir} is not a finished cbmir run: it has no {' or '.join(missing)}. Pass the "
            "output directory of a run that completed (it holds metrics.json and neighbors.npz)."
        )
    cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    unlink_embedder_mirrors(cfg)  # written resolved: follow channels_last etc. again
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        if "." not in key and isinstance(OmegaConf.select(cfg, key), DictConfig):
            raise ConfigError(
                f"override {item!r} picks a config group; a run's resolved config only takes "
                "key.path=value changes (e.g. data.root=/new/place). To search with another "
                "model or dataset, leave out --run and give the group overrides."
            )
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg, json.loads((run_dir / RUN_METRICS).read_text())


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The `cbmir` config with Hydra overrides, as the benchmark would compose it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cbmir.runner import compose

    try:
        return compose("config", overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot compose the config from {list(overrides)}: {exc}") from None


def _load_entry(path: Path) -> StoredEmbeddings:
    path = Path(path).expanduser()
    store = EmbeddingStore(path.parent)
    if not store.has(path.name):
        raise DataError(
            f"{path} is not a finished store entry (it needs manifest.json and embeddings.npy)"
        )
    return store.load(path.name)


def _run_entry(run_dir: Path, cfg: DictConfig, metrics: dict) -> StoredEmbeddings:
    recorded = metrics.get("database_entry")
    if not recorded:
        raise DataError(f"{run_dir / RUN_METRICS} names no database_entry")
    candidates = [Path(recorded), Path(str(cfg.paths.store)).expanduser() / Path(recorded).name]
    for candidate in candidates:
        if EmbeddingStore(candidate.parent).has(candidate.name):
            return _load_entry(candidate)
    raise DataError(
        f"the database embeddings of {run_dir} ({recorded}) are gone from the store. Re-run "
        "the benchmark to embed them again, or pass --store-entry DIR."
    )


def open_database(
    run_dir: str | Path | None = None,
    store_entry: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Database:
    """Config, DataModule and (where known without the extractor) the entry; cheap checks only.

    The data identity is checked here; the extractor is built later (`build_embedder`).
    """
    run_path = Path(run_dir).expanduser() if run_dir is not None else None
    if run_path is not None:
        cfg, metrics = load_run_config(run_path, overrides)
    else:
        cfg, metrics = compose_config(overrides), {}
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("predict")
    split = datamodule.database_split
    if store_entry is not None:
        entry = _load_entry(Path(store_entry))
    elif run_path is not None:
        entry = _run_entry(run_path, cfg, metrics)
    else:
        entry = None
    database = Database(cfg, datamodule, split, entry, run_path)
    if entry is not None:
        check_data(database)
    return database


def check_data(database: Database) -> None:
    """The entry's rows must be this DataModule's database split, image for image."""
    assert database.entry is not None
    found = _plain(database.datamodule.identity(database.split))
    stored = database.entry.manifest.get("data", {})
    if canonical_json(found) != canonical_json(stored):
        raise DataError(
            f"the database entry {database.entry.path} was embedded from other data than "
            f"{database.datamodule.name} {database.split} as configured now "
            f"({_differences(stored, found)}); its rows would not match these images."
        )


def build_embedder(cfg: DictConfig, volume: bool) -> Any:
    """The frozen embedder exactly as the benchmark builds it (`cbmir.pipeline.run_retrieval`):
    the extractor of `cfg.model` without its `volume` settings, which apply to 3D data only,
    seeded as the run was. Random weights are a function of the run's `model.seed` alone
    (`cbmir.extractors.random_init`), which is also in the identity the entry is checked
    against; `check_reproduces` verifies the weights on a few rows all the same."""
    import lightning as L

    from cbmir.embedding import build_embedder
    from cbmir.volumes import instantiate_extractor

    # as the run did (random weights no longer depend on it: they come from model.seed)
    L.seed_everything(int(cfg.get("seed", 0) or 0), verbose=False)
    extractor, spec = instantiate_extractor(cfg.model)
    return build_embedder(cfg, extractor, spec if volume else None)


def attach_embedder(database: Database, embedder: Any) -> None:
    """Check `embedder` against the entry (or find the entry by key when none is known yet)."""
    identity = _plain(embedder.extractor.identity())
    if database.entry is None:
        store = EmbeddingStore(str(database.cfg.paths.store))
        key = embedder.store_key(database.datamodule.identity(database.split))
        if not store.has(key):
            raise DataError(
                f"no stored embeddings of {identity.get('name')} on {database.datamodule.name} "
                f"{database.split} under {store.root}: run the benchmark with the same config "
                "first (cbmir-query never embeds a database)."
            )
        database.entry = store.load(key)
        check_data(database)
    manifest = database.entry.manifest
    stored = manifest.get("extractor", {})
    if canonical_json(identity) != canonical_json(stored):
        raise ConfigError(
            f"database built by another extractor: {database.entry.path} holds embeddings of "
            f"{stored.get('name', '?')} ({stored.get('class', '?')}), but this config builds "
            f"{identity.get('name', '?')} ({identity.get('class', '?')}). Differences: "
            f"{_differences(stored, identity)}. Query with the config the database was built "
            "with (--run RUN_DIR), or pick the matching model overrides."
        )
    if embedder.volume is not None and "volume" in manifest:
        volume = _plain(embedder.volume.identity())
        if canonical_json(volume) != canonical_json(manifest["volume"]):
            raise ConfigError(
                f"database built by another extractor setting: {database.entry.path} joined "
                f"slice features with {manifest['volume']}, this config with {volume} "
                "(model.volume.reduce / axes)."
            )
