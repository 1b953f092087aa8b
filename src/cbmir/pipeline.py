"""One retrieval job: config -> data -> extractor -> embedding store -> search -> metrics.

Each stage starts from the previous stage's files: embeddings already in the store are not
recomputed, so a new distance or k only costs a search.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cbmir.embedding import (
    EmbeddingStoreWriter,
    FrozenEmbedder,
    PlannedEntry,
    parse_channels_last,
)
from cbmir.extractors import weights_file
from cbmir.io_utils import write_json, write_text
from cbmir.resume import find_finished, hold_job_dir, job_record
from cbmir.retrieval.callback import RetrievalCallback
from cbmir.retrieval.settings import RetrievalSettings
from cbmir.store import EmbeddingStore
from cbmir.validation import check_data, validate_job
from cbmir.viz.gallery import write_gallery
from cbmir.volumes import split_model_config

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is not None and "_target_" in conf:
            log.info("logger %s", name)
            loggers.append(instantiate(conf))
    return loggers


def finish_loggers(loggers: list[Any], status: str) -> None:
    """Close every logger; a W&B run is finished so the next sweep job starts its own."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)


def input_files(datamodule: Any, weights_files: list[Path]) -> list[Path]:
    """Files a job's results depend on beyond its config: the data file and every weights file
    the extractor was built from (local checkpoint or cached hub file); a collection names
    its table or folders and every image file (`CollectionDataModule.input_files`)."""
    data_files = getattr(datamodule, "input_files", None)
    return [*(data_files() if data_files else [Path(datamodule.npz_file)]), *weights_files]


def run_retrieval(cfg: DictConfig) -> dict[str, Any]:
    """Run one job and return its metrics (also written to `metrics.json`), holding its output
    directory so that no other process runs a job there meanwhile (`cbmir.resume`)."""
    settings = validate_job(cfg)  # every setting and path, before any data or weights
    with hold_job_dir(Path(cfg.paths.output_dir)):
        return _run_retrieval(cfg, settings)


def _run_retrieval(cfg: DictConfig, settings: RetrievalSettings) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    finished = find_finished(cfg)  # resumable sweeps: same config, results exist -> skip
    if finished is not None:
        return finished
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # cheap validation first (dataset, size, files), heavy work (weights, embedding) after
    model_cfg, volume = split_model_config(cfg.model)  # model.volume is not an extractor arg
    channels_last = parse_channels_last(cfg.get("channels_last", False))
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("predict")
    if getattr(datamodule, "skipped_files", ""):  # data.on_error=skip: listed in the outputs
        write_text(output_dir / "skipped_files.txt", datamodule.skipped_files)
    check_data(settings, datamodule)  # k vs the database size, labels that rank trivially
    with weights_file.recording() as weights_files:  # the files the weights came from
        extractor = instantiate(model_cfg)
    embedder = FrozenEmbedder(
        extractor,
        channels_last=channels_last,
        volume=volume if datamodule.is_volume else None,  # 2D keys stay free of volume settings
        precision=cfg.trainer.get("precision", "32-true"),
    )
    volume_meta = {"volume": volume.identity()} if embedder.volume is not None else {}

    store = EmbeddingStore(cfg.paths.store)
    store.remove_stale_temps()  # entries a killed run left half-written (never a live run's)
    splits = [datamodule.query_split, datamodule.database_split]
    keys = {split: embedder.store_key(datamodule.identity(split)) for split in splits}
    missing = [s for s in dict.fromkeys(splits) if not store.has(keys[s])]
    dim = embedder.output_dim(tuple(datamodule.image_shape))
    plan = [
        PlannedEntry(
            split=s,
            key=keys[s],
            n_rows=len(datamodule.labels(s)),
            dim=dim,
            labels=datamodule.labels(s),
            meta={
                "extractor": extractor.identity(),
                "data": datamodule.identity(s),
                "precision": embedder.precision or "32-true",
                **volume_meta,
            },
        )
        for s in missing
    ]
    log.info(
        "embeddings: %s",
        ", ".join(f"{s}={'embed' if s in missing else 'cached'} ({keys[s][:12]})" for s in keys),
    )

    loggers = build_loggers(cfg)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    retrieval = RetrievalCallback(
        store=store,
        query_key=keys[datamodule.query_split],
        database_key=keys[datamodule.database_split],
        output_dir=output_dir,
        k=cfg.retrieval.k,
        distance=cfg.retrieval.distance,
        acc_ks=tuple(cfg.retrieval.acc_ks),
        device=cfg.retrieval.device,
        search_kwargs=OmegaConf.to_container(cfg.retrieval.search, resolve=True),
        backend=cfg.retrieval.get("backend", "torch"),
        faiss=OmegaConf.to_container(cfg.retrieval.get("faiss", {}), resolve=True),
        embedded_now=missing,
        data_facts=datamodule.data_facts(),
    )
    writer = EmbeddingStoreWriter(store, plan)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[writer, retrieval], logger=loggers)
    status = "failed"
    try:
        started = time.perf_counter()
        if plan:
            datamodule.predict_splits = missing
            trainer.predict(embedder, datamodule=datamodule, return_predictions=False)
        else:
            retrieval.evaluate(trainer)
        write_gallery(cfg, datamodule, output_dir, loggers)  # example queries: PNG (+ W&B)
        status = "success"
    finally:
        finish_loggers(loggers, status)
    metrics = dict(retrieval.metrics or {})
    log.info("job finished in %.1fs -> %s", time.perf_counter() - started, output_dir)
    # the commit record, last: it names the digests of metrics.json and config_resolved.yaml
    write_json(
        output_dir / "job.json", job_record(cfg, status, input_files(datamodule, weights_files))
    )
    return metrics
