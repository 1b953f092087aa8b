"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> Path:
    """`configs/` of a source checkout, or the copy packaged inside an installed wheel."""
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


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


def register_resolvers() -> None:
    for name, fn in (("cbmir_if", _if), ("cbmir_sweep_group", _sweep_group)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
