"""One fine-tune job: config -> data (train/val only) -> extractor + head -> Lightning fit ->
RUN_DIR/best.ckpt (best val mAP@k) and RUN_DIR/last.ckpt (resume) -> finetune.json.

Cheap checks (objective, strategy, resume file, splits) run before any weights are built.
"""

from __future__ import annotations

import logging
import shlex
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from cbmir.config import is_int
from cbmir.errors import ConfigError
from cbmir.io_utils import write_json, write_text
from cbmir.runner import build_loggers, finish_loggers

from .checkpoint import extractor_spec, read_spec
from .data import FinetuneData
from .extractor import FineTunedExtractor, ProjectionHead
from .module import RetrievalFineTuner, monitor_key
from .settings import METRIC_OBJECTIVES, FinetuneSchema, finetune_settings

log = logging.getLogger(__name__)

BEST, LAST = "best", "last"
#: projection size used by strategy=projection_head when finetune.projection_dim is unset
DEFAULT_PROJECTION_DIM = 128
#: spec entries that must match between a run and the checkpoint it resumes
RESUME_KEYS = ("base_config", "head", "normalize")


def resolve_resume(resume: Any, output_dir: Path) -> tuple[Path | None, Path]:
    """(checkpoint to resume from or None, directory the checkpoints are written to)."""
    if resume is None or resume is False or str(resume).lower() in ("", "false", "none", "null"):
        return None, output_dir
    if resume is True or str(resume).lower() == "true":
        last = output_dir / f"{LAST}.ckpt"
        if last.is_file():
            return last, output_dir
        log.warning("finetune.resume=true but %s does not exist: starting from scratch", last)
        return None, output_dir
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / f"{LAST}.ckpt"
    if not path.is_file():
        raise ConfigError(f"finetune.resume={resume}: no checkpoint at {path}")
    return path, path.parent


def _check_resumable(path: Path, spec: dict[str, Any]) -> None:
    saved = read_spec(path)
    differ = [k for k in RESUME_KEYS if saved.get(k) != spec.get(k)]
    for k in ("objective", "strategy"):
        if (saved.get("training") or {}).get(k) != spec["training"][k]:
            differ.append(f"training.{k}")
    if differ:
        raise ConfigError(
            f"cannot resume from {path}: it was trained with other settings ({', '.join(differ)}); "
            "resume with the same model and finetune settings, or start a new run"
        )


def build_extractor(
    cfg: DictConfig, ft: FinetuneSchema, image_shape: tuple[int, ...]
) -> FineTunedExtractor:
    base = instantiate(cfg.model)
    dim = ft.projection_dim
    if dim is None and ft.strategy == "projection_head":
        dim = DEFAULT_PROJECTION_DIM
    head = None
    if dim is not None:
        hidden, norm = ft.projection_hidden, ft.projection_input_norm
        head = ProjectionHead(base.output_dim(image_shape), int(dim), hidden, input_norm=norm)
    normalize = ft.objective in METRIC_OBJECTIVES if ft.normalize is None else ft.normalize
    return FineTunedExtractor(base, head, normalize=normalize, name=ft.name)


def run_finetune(
    cfg: DictConfig,
    callbacks: list[Any] | None = None,
    settings: FinetuneSchema | None = None,
) -> dict[str, Any]:
    """Fine-tune, checkpoint by val mAP@k, and return (and write) the run's summary.

    `callbacks` are extra Lightning callbacks (monitoring, tests that interrupt a run);
    `settings` is `cfg.finetune` already checked (`cbmir-finetune` checks it before this
    module's imports), else it is checked here, before anything heavy is built."""
    ft = finetune_settings(cfg) if settings is None else settings
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_path, ckpt_dir = resolve_resume(ft.resume, output_dir)
    write_text(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    source = instantiate(cfg.data)
    source.prepare_data()
    source.setup("fit")
    if source.is_volume:
        raise ConfigError("cbmir-finetune trains 2D extractors; this data set holds volumes")
    data = FinetuneData(source, ft.batch_size, seed=cfg.seed)
    image_shape = tuple(source.image_shape)

    extractor = build_extractor(cfg, ft, image_shape)
    spec = extractor_spec(OmegaConf.to_container(cfg.model, resolve=True), extractor)
    spec["training"] = {
        "objective": ft.objective,
        "strategy": ft.strategy,
        "seed": int(cfg.seed),
        "train": source.identity(data.train_split),
        "val": source.identity(data.val_split),
    }
    if resume_path is not None:
        _check_resumable(resume_path, spec)
    module = RetrievalFineTuner(
        extractor,
        spec,
        objective=ft.objective,
        strategy=ft.strategy,
        image_shape=image_shape,
        num_classes=data.num_classes(),
        multilabel=source.multilabel,
        lr=float(ft.lr),
        head_lr=None if ft.head_lr is None else float(ft.head_lr),
        weight_decay=float(ft.weight_decay),
        warmup_epochs=float(ft.warmup_epochs),
        temperature=float(ft.temperature),
        margin=float(ft.margin),
        mining=str(ft.mining),
        augment=asdict(ft.augment) if ft.augment else None,
        k=int(cfg.retrieval.k),
        distance=str(cfg.retrieval.distance),
        seed=int(cfg.seed),
    )
    trainable = module.trainable_summary()
    log.info(
        "%s: objective=%s strategy=%s, trainable backbone parameters %d of %d, head %d",
        extractor.name,
        ft.objective,
        ft.strategy,
        trainable["backbone_trainable"],
        trainable["backbone_total"],
        trainable["head"],
    )

    monitor = monitor_key(cfg.retrieval.k)
    best_cb = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename=BEST,
        monitor=monitor,
        mode="max",
        save_weights_only=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last_cb = ModelCheckpoint(dirpath=ckpt_dir, filename=LAST, enable_version_counter=False)
    loggers = build_loggers(cfg, job_type="finetune")
    # RUN_DIR is Hydra's output dir: it already holds .hydra/ and the config, by design
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # best first: last.ckpt is written after it and so holds the updated best score
    all_callbacks: list[Any] = [best_cb, last_cb, *(callbacks or [])]
    if loggers:
        all_callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=all_callbacks,
        logger=loggers or False,
        log_every_n_steps=_log_every(ft, len(data.labels(data.train_split))),
        enable_checkpointing=True,
        max_epochs=int(ft.max_epochs),
        num_sanity_val_steps=0,
        limit_train_batches=ft.limit_train_batches,
        default_root_dir=str(output_dir),
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    status, start, fit_seconds = "failed", None, None
    try:
        if resume_path is None and ft.validate_start:
            trainer.validate(module, datamodule=data, verbose=False)
            start = dict(module.val_metrics)
            log.info("untrained start: %s", _fmt(start))
        fit_started = time.perf_counter()
        trainer.fit(module, datamodule=data, ckpt_path=str(resume_path) if resume_path else None)
        fit_seconds = time.perf_counter() - fit_started
        status = "success" if not trainer.interrupted else "interrupted"
    finally:
        finish_loggers(loggers, "success" if status == "success" else "failed")

    summary = _summary(cfg, trainer, best_cb, last_cb, module, data, start, resume_path)
    summary["fit_seconds"] = None if fit_seconds is None else round(fit_seconds, 1)
    write_json(ckpt_dir / "finetune.json", summary)
    if ckpt_dir != output_dir:
        write_json(output_dir / "finetune.json", summary)
    log.info(
        "best %s = %s at epoch %s -> %s",
        monitor,
        summary["best_score"],
        summary["best_epoch"],
        summary["best_checkpoint"],
    )
    if summary["beats_start"] is False:
        log.warning(
            "fine-tuning did not beat the untrained start on val (%s: start %.4f, best %.4f); "
            "best.ckpt holds the best fine-tuned epoch, the frozen model may be the better choice",
            monitor,
            start[monitor],
            summary["best_score"],
        )
    log.info("evaluate it on the benchmark's queries: %s", summary["evaluate_command"])
    return summary


def _log_every(ft: FinetuneSchema, n_train: int) -> int:
    """Log at least once per epoch, even when an epoch has fewer batches than asked."""
    batches = max(1, n_train // int(ft.batch_size))
    if is_int(ft.limit_train_batches):
        batches = min(batches, max(1, ft.limit_train_batches))
    return max(1, min(int(ft.log_every_n_steps), batches))


def _fmt(metrics: dict[str, float] | None) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in (metrics or {}).items())


def _summary(
    cfg: DictConfig,
    trainer: L.Trainer,
    best_cb: ModelCheckpoint,
    last_cb: ModelCheckpoint,
    module: RetrievalFineTuner,
    data: FinetuneData,
    start: dict[str, float] | None,
    resume_path: Path | None,
) -> dict[str, Any]:
    best = Path(best_cb.best_model_path) if best_cb.best_model_path else None
    best_epoch = None
    if best is not None and best.is_file():
        saved = torch.load(str(best), map_location="cpu", weights_only=True, mmap=True)
        best_epoch = saved.get("epoch")
    score = best_cb.best_model_score
    data_args = _data_overrides(cfg)
    return {
        "name": module.extractor.name,
        "objective": cfg.finetune.objective,
        "strategy": cfg.finetune.strategy,
        "monitor": best_cb.monitor,
        "best_score": None if score is None else float(score),
        "best_epoch": best_epoch,
        "best_checkpoint": str(best) if best else None,
        "last_checkpoint": last_cb.last_model_path or last_cb.best_model_path or None,
        "resumed_from": str(resume_path) if resume_path else None,
        "epochs_done": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "interrupted": bool(trainer.interrupted),
        "start_val": start,
        "beats_start": None
        if start is None or score is None
        else bool(float(score) > start[best_cb.monitor]),
        "last_val": dict(module.val_metrics),
        "trainable_parameters": module.trainable_summary(),
        "splits_read": sorted(set(data.reads)),
        "query_split_untouched": data.query_split not in data.reads,
        "evaluate_command": shlex.join(
            ["cbmir", "model=finetuned", f"model.checkpoint={best}", *data_args]
        ),
    }


def _data_overrides(cfg: DictConfig) -> list[str]:
    """The data overrides this job was started with (to evaluate on the same data set)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # not under @hydra.main
        return []
    overrides = HydraConfig.get().overrides.task
    return [o for o in overrides if o.startswith(("data=", "data.", "experiment="))]
