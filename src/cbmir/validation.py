"""A retrieval job's settings, checked before any weights are loaded or images embedded.

Three stages, cheapest first, each raising a `CbmirError` that names the key and what it
accepts (`cli.run_job` prints it as one line, exit code 2):

1. `check_config`: values only (retrieval, trainer, data loader, seed, resume, gallery,
   channels_last, model.volume); no file is touched.
2. `check_paths`: the embedding store and the job's output folder are writable directories
   (a probe file is created and removed: permission bits say nothing for root);
   `check_data_source`: the file or folder `data.path` names exists.

Stages 1 and 2 import neither Lightning nor torchmetrics nor any model library (tests/
test_startup.py): `cbmir` runs them before it imports the pipeline, so bad input costs about a
second. Only an accelerator other than auto/cpu, or a precision outside `COMMON_PRECISIONS`,
asks Lightning itself.
3. `check_data`: rules that need the data: k against the database split's size, and a
   database whose labels make every ranking score the same (the metrics would describe the
   labels, not the model).

Docs: docs/reliability.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cbmir.config import check_int
from cbmir.errors import ConfigError, DataError
from cbmir.retrieval.settings import PromptSettings, RetrievalSettings
from cbmir.schema import typed

log = logging.getLogger(__name__)


def lightning_precisions() -> tuple[Any, ...]:
    """Every `trainer.precision` Lightning accepts (its own list, so new ones appear here)."""
    from lightning.fabric.plugins.precision.precision import (
        _PRECISION_INPUT_INT,
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )

    return (
        get_args(_PRECISION_INPUT_STR)
        + get_args(_PRECISION_INPUT_STR_ALIAS)
        + get_args(_PRECISION_INPUT_INT)
    )


#: precisions every supported Lightning (>= 2.3) accepts: these pass without importing it (a
#: test pins them among `lightning_precisions`); any other value is Lightning's to judge
COMMON_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
COMMON_PRECISIONS += ("32", "16", "bf16", "64", 32, 16, 64)


def check_precision(precision: Any) -> None:
    """One of Lightning's precisions (None: its default)."""
    if precision is None or precision in COMMON_PRECISIONS:
        return
    choices = lightning_precisions()
    if precision not in choices:
        shown = ", ".join(str(c) for c in dict.fromkeys(str(c) for c in choices))
        raise ConfigError(
            f"trainer.precision={precision!r} is not a precision; choose one of {shown}"
        )


def check_accelerator(accelerator: Any) -> None:
    """auto, or an accelerator Lightning knows and this machine has (gpu: CUDA or MPS)."""
    name = str(accelerator)
    if name in ("auto", "cpu"):  # always there: no need to import Lightning's registry
        return
    from lightning.pytorch.accelerators import AcceleratorRegistry

    known = sorted(AcceleratorRegistry.available_accelerators())

    def present(kind: str) -> bool:
        return bool(AcceleratorRegistry[kind]["accelerator"].is_available())

    if name == "gpu":
        available = present("cuda") or present("mps")
    elif name in known:
        available = present(name)
    else:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r}; choose one of auto, gpu, {', '.join(known)}"
        )
    if not available:
        raise ConfigError(f"trainer.accelerator={name} but this machine has none; use auto or cpu")


@dataclass
class GallerySchema:
    n_queries: int | None = 8  # 0 or null: no gallery (config.yaml: 8)

    def __post_init__(self) -> None:
        check_int(self.n_queries or 0, "gallery.n_queries (0: no gallery)", minimum=0)


@dataclass
class LoaderSchema:
    """The data loader keys every datamodule takes (the others are its own arguments)."""

    batch_size: int = 1
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_int(self.batch_size, "data.batch_size")
        check_int(self.num_workers, "data.num_workers", minimum=0)


@dataclass
class JobSchema:
    """The keys of a `cbmir` job that no instantiated target checks: the top level's, the
    gallery's and the loader's (`RetrievalSettings` and `VolumeSpec` type their own groups)."""

    seed: int = 0
    resume: Any = "auto"  # auto | true | false (`cbmir.resume.resume_enabled`)
    gallery: GallerySchema = field(default_factory=GallerySchema)
    data: LoaderSchema = field(default_factory=LoaderSchema)


def check_config(cfg: DictConfig) -> RetrievalSettings:
    """Stage 1: every setting's value; returns the validated retrieval settings."""
    from cbmir.config import check_embedder_config
    from cbmir.resume import resume_enabled
    from cbmir.volumes import VolumeSpec

    check_job_keys(cfg)
    resume_enabled(cfg)  # auto / true / false
    VolumeSpec.from_config(cfg.model.get("volume"))
    check_precision(cfg.trainer.get("precision", "32-true"))
    check_embedder_config(cfg)  # channels_last; the store key's precision is the Trainer's
    check_accelerator(cfg.trainer.get("accelerator", "auto"))
    settings = RetrievalSettings.from_config(cfg.retrieval)
    if settings.query == "text":  # a model with a text tower and valid prompts (docs/text.md)
        from cbmir.extractors.text import check_text_tower  # imports torch

        check_text_tower(cfg.model, str(cfg.model.get("name", "?")))
        PromptSettings.from_config(cfg.retrieval.get("prompts"))
    return settings


def check_job_keys(cfg: DictConfig) -> JobSchema:
    """`JobSchema`'s keys of `cfg` (only those: a datamodule has more keys of its own)."""
    data = {key: cfg.data[key] for key in ("batch_size", "num_workers") if key in cfg.data}
    return typed(
        JobSchema,
        {
            "seed": cfg.get("seed", 0),
            "resume": cfg.get("resume", "auto"),
            "gallery": {"n_queries": OmegaConf.select(cfg, "gallery.n_queries", default=0)},
            "data": data,
        },
        "",
    )


def writable_dir(path: str | os.PathLike, key: str, hint: str) -> Path:
    """Create `path` if needed and prove it takes files (a probe, created and removed)."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cbmir-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{key}={path} is not a writable directory ({reason}); {hint}") from None
    return path


#: where a job's output folder comes from (Hydra's run/sweep dir under paths.log_dir)
OUTPUT_HINT = "set paths.log_dir=DIR (or CBMIR_LOG_DIR) to a writable folder"


def check_paths(cfg: DictConfig) -> None:
    """Stage 2: where the job writes: embeddings and its own results."""
    writable_dir(
        cfg.paths.store, "paths.store", "set paths.store=DIR (or CBMIR_STORE) to a writable folder"
    )
    writable_dir(cfg.paths.output_dir, "paths.output_dir", OUTPUT_HINT)


def check_data(settings: RetrievalSettings, datamodule: Any) -> None:
    """Stage 3: the rules that need the prepared data (labels only; no image is read)."""
    database = datamodule.labels(datamodule.database_split)
    settings.check_database(len(database))
    queries = datamodule.labels(datamodule.query_split)
    if ranking_is_irrelevant(queries, database, bool(datamodule.multilabel)):
        n_classes = len(np.unique(np.asarray(database).reshape(len(database), -1), axis=0))
        raise DataError(
            f"the {datamodule.database_split} database split of {datamodule.name} has "
            f"{n_classes} distinct label(s) and to each {datamodule.query_split} query either "
            "every database image is relevant or none is: every ranking scores the same, so "
            "the metrics would not depend on the model. Use data with two or more classes in "
            "the database (data.database_split, or another file)"
        )


def ranking_is_irrelevant(
    query_labels: np.ndarray, database_labels: np.ndarray, multilabel: bool
) -> bool:
    """True when, for every query, the database items are all relevant or all irrelevant
    (e.g. a one-class database): then map, mmv and acc are the same for any ranking."""
    from cbmir.retrieval.labels import encode_pair

    q_rows = np.unique(np.asarray(query_labels).reshape(len(query_labels), -1), axis=0)
    d_rows = np.unique(np.asarray(database_labels).reshape(len(database_labels), -1), axis=0)
    if len(d_rows) <= 1:
        return True
    q, d = encode_pair(q_rows, d_rows, multilabel=multilabel)
    relevant = (q[:, None, :] & d[None, :, :]).any(dim=-1)  # [distinct queries, distinct items]
    return bool((relevant.all(dim=1) | ~relevant.any(dim=1)).all())


#: what a data.path file holds, said when it is missing (the datamodules say it too)
_EXPECTED_FILE = {
    "npz": "data=npz expects an .npz file with keys train_images, train_labels, test_images, "
    "test_labels (val_* optional)",
    "table": "data=csv expects a CSV, TSV or Parquet table of image paths and labels",
}


def check_data_source(cfg: DictConfig) -> None:
    """Stage 2 too: the file or folder `data.path` names (data=npz, csv, folder) exists, so a
    mistyped path fails before Lightning and the datamodule are imported; the datamodule
    checks it again, with everything else about its files."""
    path = OmegaConf.select(cfg, "data.path", default=None)
    target = str(OmegaConf.select(cfg, "data._target_", default=""))
    if path is None or not target.endswith(("NpzDataModule", "CollectionDataModule")):
        return
    source = Path(str(path)).expanduser().absolute()
    collection = target.endswith("CollectionDataModule")
    if collection and OmegaConf.select(cfg, "data.kind", default="folder") == "folder":
        if not source.is_dir():
            raise DataError(
                f"data.path={source.resolve()} is not a folder; data=folder expects "
                "DIR/<class>/<file> or DIR/<split>/<class>/<file>."
            )
    elif not source.exists():
        expected = _EXPECTED_FILE["table" if collection else "npz"]
        raise DataError(f"data.path={source} does not exist; {expected}.")


def validate_job(cfg: DictConfig) -> RetrievalSettings:
    """Stages 1 and 2, in that order: the checks that need no data."""
    settings = check_config(cfg)
    check_paths(cfg)
    check_data_source(cfg)
    return settings
