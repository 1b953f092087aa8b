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

from cbmir.distributed import (
    DistributedStoreWriter,
    check_launch,
    hold_job_dir_once,
    is_launch_primary,
    part_ranks,
)
from cbmir.embedding import PlannedEntry, build_embedder
from cbmir.extractors import weights_file
from cbmir.extractors.text import build_text_encoder
from cbmir.extractors.text import shared_space_config as text_shared_space
from cbmir.figures.gallery import DEFAULT_N_QUERIES, write_gallery, write_neighbor_table
from cbmir.figures.text_gallery import write_text_gallery
from cbmir.io_utils import write_json, write_text
from cbmir.resume import find_finished, job_record
from cbmir.retrieval import text_queries
from cbmir.retrieval.callback import RetrievalCallback
from cbmir.retrieval.settings import TEXT_QUERY_KEYS, RetrievalSettings
from cbmir.runner import build_loggers, finish_loggers
from cbmir.store import EmbeddingStore
from cbmir.validation import check_data, validate_job
from cbmir.volumes import split_model_config

log = logging.getLogger(__name__)


def input_files(datamodule: Any, weights_files: list[Path]) -> list[Path]:
    """Files a job's results depend on beyond its config: the data file and every weights file
    the extractor was built from (local checkpoint or cached hub file); a collection names
    its table or folders and every image file (`CollectionDataModule.input_files`)."""
    data_files = getattr(datamodule, "input_files", None)
    return [*(data_files() if data_files else [Path(datamodule.npz_file)]), *weights_files]


def run_retrieval(cfg: DictConfig, settings: RetrievalSettings | None = None) -> dict[str, Any]:
    """Run one job and return its metrics (also written to `metrics.json`), holding its output
    directory so that no other process runs a job there meanwhile (`cbmir.resume`).
    `settings`: what `validate_job(cfg)` returned, where the caller ran it already."""
    if settings is None:
        settings = validate_job(cfg)  # every setting and path, before any data or weights
    check_launch(cfg.trainer)  # DDP: one job, never a sweep's
    with hold_job_dir_once(Path(cfg.paths.output_dir)):  # ranks > 0 run inside rank 0's hold
        return _run_retrieval(cfg, settings)


def _run_retrieval(cfg: DictConfig, settings: RetrievalSettings) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    primary = is_launch_primary()  # DDP ranks > 0 embed their share and write nothing else
    finished = find_finished(cfg) if primary else None  # same config, results exist -> skip
    if finished is not None:
        return finished
    output_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        write_text(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # cheap validation first (dataset, size, files), heavy work (weights, embedding) after
    model_cfg, volume = split_model_config(cfg.model)  # model.volume is not an extractor arg
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("predict")
    if getattr(datamodule, "skipped_files", ""):  # data.on_error=skip: listed in the outputs
        write_text(output_dir / "skipped_files.txt", datamodule.skipped_files)
    check_data(settings, datamodule)  # k vs the database size, labels that rank trivially
    text = settings.query == "text"
    if text:  # prompts from the label names, checked before any weights load
        prompts = text_queries.dataset_prompts(cfg.retrieval, datamodule)
        model_cfg = text_shared_space(model_cfg)
    with weights_file.recording() as weights_files:  # the files the weights came from
        extractor = instantiate(model_cfg)
        if text:  # its text tower too, before any embedding (tokenizer, weights: docs/text.md)
            text_encoder = build_text_encoder(model_cfg)
    embedder = build_embedder(cfg, extractor, volume if datamodule.is_volume else None)
    volume_meta = {"volume": volume.identity()} if embedder.volume is not None else {}

    store = EmbeddingStore(cfg.paths.store)
    store.remove_stale_temps()  # entries a killed run left half-written (never a live run's)
    splits = [datamodule.query_split, datamodule.database_split]
    keys = {split: embedder.store_key(datamodule.identity(split)) for split in splits}
    missing = [s for s in dict.fromkeys(splits) if not store.has(keys[s])]
    if text:  # text queries need only the database's images
        missing = [s for s in missing if s == datamodule.database_split]
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
    if text:  # the class prompts search the database split (docs/text.md)
        retrieval: RetrievalCallback | text_queries.TextRetrievalCallback = (
            text_queries.TextRetrievalCallback(
                store=store,
                database_key=keys[datamodule.database_split],
                output_dir=output_dir,
                model_cfg=None,
                encoder=text_encoder,
                prompts=prompts,
                label_names=datamodule.label_names,
                k=settings.k,
                acc_ks=settings.acc_ks,
                embedded_now=missing,
                data_facts=datamodule.data_facts(),
                metrics=settings.metrics,
            )
        )
    else:
        image_queries = {  # k, distance, ... from `cfg.retrieval`, less the text protocol's keys
            key: value
            for key, value in OmegaConf.to_container(cfg.retrieval, resolve=True).items()
            if key not in TEXT_QUERY_KEYS
        }
        retrieval = instantiate(
            image_queries,
            store=store,
            query_key=keys[datamodule.query_split],
            database_key=keys[datamodule.database_split],
            output_dir=output_dir,
            embedded_now=missing,
            data_facts=datamodule.data_facts(),
            metrics=settings.metrics,
        )
    writer = DistributedStoreWriter(store, plan)  # one device: EmbeddingStoreWriter
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[writer, retrieval], logger=loggers)
    status = "failed"
    try:
        started = time.perf_counter()
        if plan:
            datamodule.predict_splits = missing
            trainer.predict(embedder, datamodule=datamodule, return_predictions=False)
            if trainer.world_size > 1:  # DDP: rank 0 searches, scores and writes the outputs
                if not part_ranks(trainer):
                    status = "success"
                    return {}
                retrieval.evaluate(trainer)
        else:
            retrieval.evaluate(trainer)
        n_queries = OmegaConf.select(cfg, "gallery.n_queries", default=DEFAULT_N_QUERIES)
        run_name = cfg.get("run_name", "")
        if text:  # top-k images per class prompt
            write_text_gallery(datamodule, output_dir, n_queries, run_name=run_name)
        else:
            write_neighbor_table(datamodule, output_dir)  # own collections: files, label names
            write_gallery(  # example queries: PNG (+ W&B)
                datamodule,
                output_dir,
                n_queries,
                seed=cfg.get("seed", 0),
                run_name=run_name,
                distance=cfg.retrieval.distance,
                loggers=loggers,
            )
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
