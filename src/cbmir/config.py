"""Plain-config helpers of the core layer: where the Hydra configs live, OmegaConf -> plain
data, yes/no words, integers, choices, multirun, and the `embedder` node's rules (here, not in
`cbmir.embedding`, so validating a job needs no Lightning). Resolvers are registered by the
entry points (`cbmir.resolvers`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from cbmir.errors import ConfigError


def config_dir() -> Path:
    """`configs/` of a source checkout, or the copy packaged inside an installed wheel."""
    packaged = Path(__file__).parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def is_int(value: Any) -> bool:
    """A real integer (a bool, float or numeric string is not)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_int(value: Any, key: str, minimum: int = 1) -> int:
    """`value` when it is an integer >= `minimum`; else a ConfigError naming `key`."""
    if not is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return int(value)


def check_choice(value: Any, choices: Sequence[str], key: str) -> str:
    """`value` when it is one of `choices`; else a ConfigError naming `key` and the choices."""
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")
    return str(value)


def to_plain(value: Any) -> Any:
    """OmegaConf containers (at any depth) -> plain dicts/lists: JSON-able identities, kwargs."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


#: the words a yes/no setting says "yes" with (huggingface_hub reads its flags the same way)
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def is_true(value: object) -> bool:
    """One reading of yes/no settings and environment flags: `true`, `1`, `yes`, `on`."""
    return str(value).strip().lower() in TRUE_WORDS


def is_multirun() -> bool:
    """Whether this process runs a Hydra multirun (a sweep): failed jobs do not stop it, and
    `resume=auto` resumes."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


#: the class `cfg.embedder` builds (`cbmir.embedding.build_embedder`)
EMBEDDER_TARGET = "cbmir.embedding.FrozenEmbedder"


def numeric_precision(precision: str | int) -> str | None:
    """Lightning's `precision` as it bears on the embeddings: None for float32 ("32-true",
    "32", 32), otherwise its canonical name ("bf16-mixed", "16-mixed", "64-true", ...)."""
    name = str(precision).lower()
    name = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}.get(
        name, name
    )
    return None if name == "32-true" else name


#: `cfg.embedder` settings -> the user-facing keys they mirror (`${...}` in config.yaml)
EMBEDDER_MIRRORS = {"channels_last": "channels_last", "precision": "trainer.precision"}
_MIRROR_DEFAULTS = {"channels_last": False, "precision": "32-true"}


def embedder_config(cfg: Any) -> dict[str, Any]:
    """`cfg.embedder` resolved, a mirrored setting it lacks read from its key: a run config
    written before the node existed, or one whose mirrors the query tool re-linked
    (`unlink_embedder_mirrors`), builds the embedder it was run with."""
    node = OmegaConf.select(cfg, "embedder")
    plain = {} if node is None else dict(OmegaConf.to_container(node, resolve=True))
    plain.setdefault("_target_", EMBEDDER_TARGET)
    for setting, key in EMBEDDER_MIRRORS.items():
        if setting not in plain:
            plain[setting] = OmegaConf.select(cfg, key, default=_MIRROR_DEFAULTS[setting])
    return plain


def unlink_embedder_mirrors(cfg: Any) -> None:
    """Drop the mirrored settings of a resolved run config's `embedder` node, so overrides of
    `channels_last` / `trainer.precision` reach the embedder as they do in a fresh run."""
    node = OmegaConf.select(cfg, "embedder")
    for setting in EMBEDDER_MIRRORS:
        if node is not None and setting in node:
            del node[setting]


def check_embedder_config(cfg: Any) -> None:
    """`cfg.embedder` before any work: channels_last valid, and the precision the store key
    takes equal to the one the Trainer computes in (else bf16 vectors get a float32 key)."""
    node = embedder_config(cfg)
    parse_channels_last(node["channels_last"])
    keyed = numeric_precision(node["precision"])
    computed = numeric_precision(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    if keyed != computed:
        raise ConfigError(
            f"embedder.precision={node['precision']!r} differs from trainer.precision "
            f"({computed or '32-true'}), the precision the embeddings are computed in: "
            "set trainer.precision and leave embedder.precision at ${trainer.precision}"
        )


def parse_channels_last(setting: bool | str) -> bool | str:
    """Validate `channels_last` (true / false / auto) before any heavy work."""
    if isinstance(setting, bool) or str(setting).lower() == "auto":
        return setting if isinstance(setting, bool) else "auto"
    raise ConfigError(f"channels_last={setting!r}: use true, false or auto")
