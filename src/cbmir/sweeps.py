"""Sweep plumbing shared by the experiment presets: grid cells and stable job directories.

Hydra's basic sweeper only takes Cartesian products, but the paper's grid is not one: the 3D
sets have no 128/224 px files. A *cell* (``breastmnist@28``) names one dataset at one size, so
``cell`` x ``model`` covers the whole grid in one sweep (``experiment=paper``).

Job directories are named after the job and its config, not its number
(``vgg19-breastmnist-28-3f9c0a1b2d``: run name, result-changing overrides, the first digits of
the resume fingerprint), so re-launching a sweep lands every job in the directory that already
holds its results (see `cbmir.resume`), and jobs of different configs (two grids launched into
one sweep directory, a preset with other defaults) never share a directory. Light on purpose:
registered as resolvers by `cbmir.resolvers`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cbmir.errors import ConfigError
from cbmir.resume import VOLATILE_PATHS, fingerprint

#: overrides already spelled out by the run name (model-dataset-size) or chosen by the preset
IDENTITY_KEYS = frozenset({"model", "model.name", "data", "data.flag", "data.size", "cell"})
#: overrides that never change a result (where files go, how they are logged, how fast): the
#: keys the resume fingerprint ignores, plus the preset's own name
VOLATILE_KEYS = frozenset(VOLATILE_PATHS) | {"experiment"}
VOLATILE_PREFIXES = ("paths.", "logger.", "hydra.", "hydra/")
MAX_SUBDIR = 120
#: hex digits of the fingerprint in a job directory's name
FINGERPRINT_CHARS = 10
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]+")


def parse_cell(cell: object) -> tuple[str, int]:
    """``"breastmnist@28"`` -> ``("breastmnist", 28)``; anything else is a ConfigError."""
    text = str(cell).strip()
    flag, sep, size = text.partition("@")
    if not sep or not flag or not size.isdigit():
        raise ConfigError(
            f"cell={text!r}: a grid cell is DATASET@SIZE, e.g. cell=breastmnist@28 "
            "(comma-separate several in a sweep: cell=breastmnist@28,adrenalmnist3d@64)."
        )
    return flag.lower(), int(size)


def cell_part(cell: object, part: str) -> str | int:
    """Resolver ``${cbmir_cell:${cell},flag}`` / ``${cbmir_cell:${cell},size}``."""
    flag, size = parse_cell(cell)
    if part == "flag":
        return flag
    if part == "size":
        return size
    raise ConfigError(f"cbmir_cell: part must be 'flag' or 'size', not {part!r}")


def override_key(override: str) -> str:
    """The key of a command-line override: ``+a.b=1`` -> ``a.b``, ``model=vgg19`` -> ``model``."""
    return override.split("=", 1)[0].lstrip("+~")


def is_volatile(key: str) -> bool:
    return key in VOLATILE_KEYS or key.startswith(VOLATILE_PREFIXES)


def extra_overrides(overrides: Iterable[str]) -> list[str]:
    """Overrides that change a result but are not in the run name (e.g. ``retrieval=cosine``)."""
    keep = []
    for override in overrides:
        key = override_key(override)
        if key not in IDENTITY_KEYS and not is_volatile(key):
            keep.append(override.lstrip("+"))
    return sorted(keep)


def job_subdir(run_name: str, overrides: Iterable[str]) -> str:
    """A job's directory name: its run name, plus its extra overrides when it has any.

    Deterministic (same job -> same directory on every launch), one path component, and short:
    long extras become a hash.
    """
    name = _UNSAFE.sub("_", str(run_name)).strip("._") or "job"
    extras = ",".join(extra_overrides(overrides))
    if not extras:
        return name
    tail = _UNSAFE.sub("_", extras)
    if len(name) + 2 + len(tail) > MAX_SUBDIR:
        tail = hashlib.sha1(extras.encode()).hexdigest()[:10]
    return f"{name}__{tail}"


def launch_fingerprint(root: DictConfig) -> str:
    """The resume fingerprint of a job, computed from the whole config (hydra node included)
    while Hydra is still choosing its output directory: the same as `fingerprint` of the job's
    config later on (the hydra node and every path are left out of both)."""
    tree = OmegaConf.to_container(root, resolve=False)
    assert isinstance(tree, dict)
    tree.pop("hydra", None)
    job = OmegaConf.create(tree)
    if OmegaConf.select(job, "paths.output_dir") is not None:
        job.paths.output_dir = ""  # ${hydra:runtime.output_dir}: what is being decided
    try:
        return fingerprint(job)
    except OmegaConfBaseException:  # OmegaConf wraps what a resolver raises in its own error
        # a config that does not resolve fails inside its job, with its own error.json; its
        # directory is still its own: named by the unresolved config
        text = json.dumps(tree, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def hydra_job_subdir(run_name: str, _root_: DictConfig) -> str:
    """Resolver ``${cbmir_job_subdir:${run_name}}`` for ``hydra.sweep.subdir``: the job's
    readable name plus the start of its config's fingerprint."""
    from hydra.core.hydra_config import HydraConfig

    overrides: list[str] = []
    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    digest = launch_fingerprint(_root_)[:FINGERPRINT_CHARS]
    return f"{job_subdir(run_name, overrides)}-{digest}"
