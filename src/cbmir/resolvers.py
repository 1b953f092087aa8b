"""The OmegaConf resolvers cbmir's configs use (`${cbmir_...:}`), registered by the entry points
(`cbmir.runner.main_entry`, `cbmir.runner.compose`), not on import: importing an extractor or
the embedder must not pull in the sweep machinery."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from cbmir.config import is_multirun, is_true


def _if(condition: object, then: object, otherwise: object) -> object:
    return then if is_true(condition) else otherwise


def _sweep_group() -> str:
    """W&B group: the sweep directory's name in multirun, the run directory's otherwise."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "interactive"
    hc = HydraConfig.get()
    return Path(hc.sweep.dir if is_multirun() else hc.run.dir).name


def _checkpoint_info(path: object = None, field: str = "name") -> str | None:
    """`name` stored in a cbmir-finetune checkpoint, or the file's `sha256` (so a resumable
    sweep's config fingerprint changes when the file does): `model=finetuned`."""
    from cbmir.finetune.checkpoint import checkpoint_info

    return checkpoint_info(path, field)


def _stem(path: object) -> str | None:
    """File name without extension: the default name of a custom dataset."""
    return Path(str(path)).stem if path not in (None, "", "???") else None


def _run_name(*parts: object) -> str:
    """model-dataset-size, leaving out parts that are unset (a custom npz has no size)."""
    return "-".join(str(p) for p in parts if p not in (None, "", "None"))


def register_resolvers() -> None:
    """Register every `cbmir_*` resolver once (a second call is a no-op)."""
    from cbmir.retrieval.settings import default_acc_ks
    from cbmir.sweeps import cell_part, hydra_job_subdir

    for name, fn in (
        ("cbmir_if", _if),
        ("cbmir_sweep_group", _sweep_group),
        ("cbmir_cell", cell_part),  # grid cells of the sweep presets (cbmir.sweeps)
        ("cbmir_job_subdir", hydra_job_subdir),  # stable job dirs for resumable sweeps
        ("cbmir_checkpoint", _checkpoint_info),  # model=finetuned: name, file hash
        ("cbmir_stem", _stem),  # data=npz: name defaults to the file's stem
        ("cbmir_run_name", _run_name),  # model-dataset-size without unset parts
        ("cbmir_acc_ks", default_acc_ks),  # retrieval.acc_ks: the paper's, up to k
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
