"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def config_dir() -> Path:
    """`configs/` of a source checkout, or the copy packaged inside an installed wheel."""
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def to_plain(value: Any) -> Any:
    """OmegaConf containers (at any depth) -> plain dicts/lists: JSON-able identities, kwargs."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def _if(condition: object, then: object, otherwise: object) -> object:
    return then if str(condition).lower() in ("true", "1", "yes") else otherwise


def _sweep_group() -> str:
    """W&B group: the sweep directory's name in multirun, the run directory's otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return "interactive"
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).name
    return Path(hc.run.dir).name


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


#: the ACC@k cut-offs the paper reports
PAPER_ACC_KS = (1, 3, 5)


def _default_acc_ks(k: object) -> list[int]:
    """`retrieval.acc_ks` by default: the paper's cut-offs that `k` neighbours can answer
    ([1, 3, 5] at k = 5, [1, 3] at k = 3), so a sweep over k needs no acc_ks of its own; an
    explicit list beyond k is an error (`cbmir.retrieval.settings.check_acc_ks`). A k that is
    not a positive integer is left to that validation: the paper's list is returned as is."""
    try:
        limit = int(str(k))
    except ValueError:
        return list(PAPER_ACC_KS)
    return [a for a in PAPER_ACC_KS if a <= limit] or list(PAPER_ACC_KS)


def register_resolvers() -> None:
    from cbmir.sweeps import cell_part, hydra_job_subdir

    for name, fn in (
        ("cbmir_if", _if),
        ("cbmir_sweep_group", _sweep_group),
        ("cbmir_cell", cell_part),  # grid cells of the sweep presets (cbmir.sweeps)
        ("cbmir_job_subdir", hydra_job_subdir),  # stable job dirs for resumable sweeps
        ("cbmir_checkpoint", _checkpoint_info),  # model=finetuned: name, file hash
        ("cbmir_stem", _stem),  # data=npz: name defaults to the file's stem
        ("cbmir_run_name", _run_name),  # model-dataset-size without unset parts
        ("cbmir_acc_ks", _default_acc_ks),  # retrieval.acc_ks: the paper's, up to k
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
