"""What a fine-tune checkpoint carries beyond weights, and how `model=finetuned` rebuilds it.

`cbmir-finetune` writes Lightning checkpoints whose state dict holds `extractor.*` (backbone and
head) plus training-only parts (a classifier, loss parameters). Next to it, under `CKPT_KEY`, it
stores a plain-data *spec*: the base model's Hydra config with its weight sources switched off
(the architecture only), the base's preprocessing identity, the projection head's sizes and the
normalisation flag. `load_finetuned` (the `_target_` of `configs/model/finetuned.yaml`) rebuilds
that architecture offline and loads the weights through `cbmir.extractors.checkpoint`, so no glue
code is needed between a fine-tune and the benchmark.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cbmir.errors import ConfigError, reason
from cbmir.extractors.checkpoint import (
    CheckpointError,
    UnreadableWeightsError,
    load_into,
    load_torch_file,
    weights_identity,
)

from .extractor import FineTunedExtractor, ProjectionHead, architecture_identity

log = logging.getLogger(__name__)

#: key of the spec inside a Lightning checkpoint written by cbmir-finetune
CKPT_KEY = "cbmir_finetune"
FORMAT = 1
#: config keys that pick a weight source; off when the architecture is rebuilt
WEIGHT_SOURCES = {"pretrained": False, "checkpoint": None, "hf_hub_id": None}
#: identity keys that are library versions: a difference is worth a warning, not a refusal
VERSION_KEYS = ("timm", "open_clip", "torch")


def architecture_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A model config (plain dict, resolved) that builds the same network without weights."""
    return {**model_cfg, **{k: v for k, v in WEIGHT_SOURCES.items() if k in model_cfg}}


def extractor_spec(model_cfg: Mapping[str, Any], extractor: FineTunedExtractor) -> dict[str, Any]:
    """Everything `build_from_spec` needs; plain data so `torch.load(weights_only=True)` reads it."""
    return {
        "format": FORMAT,
        "name": extractor.name,
        "base_config": architecture_config(model_cfg),
        "base_identity": architecture_identity(extractor.base),
        "head": extractor.head_spec(),
        "normalize": extractor.normalize,
    }


def build_from_spec(spec: Mapping[str, Any]) -> FineTunedExtractor:
    """The fine-tuned architecture with untrained weights (to be loaded)."""
    from hydra.utils import instantiate

    if spec.get("format") != FORMAT:
        raise CheckpointError(
            f"fine-tune checkpoint format {spec.get('format')!r} is not supported (expected {FORMAT})"
        )
    base = instantiate(dict(spec["base_config"]))
    _check_same_architecture(spec.get("base_identity") or {}, architecture_identity(base))
    head = ProjectionHead(**spec["head"]) if spec.get("head") else None
    return FineTunedExtractor(base, head, normalize=bool(spec["normalize"]), name=spec["name"])


def _check_same_architecture(saved: Mapping[str, Any], rebuilt: Mapping[str, Any]) -> None:
    """The rebuilt base must preprocess and pool like the one that was trained."""
    differ = sorted(k for k in set(saved) | set(rebuilt) if saved.get(k) != rebuilt.get(k))
    if not differ:
        return
    listing = "; ".join(
        f"{k}: trained {saved.get(k)!r}, rebuilt {rebuilt.get(k)!r}" for k in differ
    )
    if all(k in VERSION_KEYS for k in differ):
        log.warning("fine-tuned extractor rebuilt with other library versions (%s)", listing)
        return
    raise CheckpointError(
        f"the rebuilt base extractor differs from the one that was fine-tuned ({listing})"
    )


def read_spec(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """The spec stored in a cbmir-finetune checkpoint; CheckpointError for any other file.
    Objects beyond plain data are unpickled only with `trust` (see `load_torch_file`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = load_torch_file(path, trust=trust)
    except UnreadableWeightsError as exc:  # every other failure of the file is already one
        raise CheckpointError(
            f"could not read {path} as a cbmir-finetune checkpoint ({reason(exc)})"
        ) from exc
    spec = obj.get(CKPT_KEY) if isinstance(obj, Mapping) else None
    if not isinstance(spec, Mapping):
        raise CheckpointError(
            f"{path} was not written by cbmir-finetune (no {CKPT_KEY!r} entry): for plain "
            "weights of a base architecture use model=<base model> model.checkpoint=<file>"
        )
    return dict(spec)


def load_finetuned(
    checkpoint: str | os.PathLike | None = None,
    name: str | None = None,
    pretrained: bool = False,
    sha256: str | None = None,
    trust_checkpoint: bool = False,
    seed: int | None = None,
) -> FineTunedExtractor:
    """`model=finetuned`: rebuild the fine-tuned extractor stored in `checkpoint` and load it.

    `pretrained` and `seed` are accepted and ignored (the weights are the checkpoint's), so
    presets such as `experiment=offline` that set `model.pretrained=false`, and the config's
    `model.seed`, apply to every model alike.
    `sha256` (filled in by the config) must match the file when given: it did not change
    between composing the config and loading. `trust_checkpoint` allows a file that holds
    pickled objects beyond plain data (unpickling can run code).
    """
    del pretrained, seed
    if not checkpoint:
        raise ConfigError(
            "model=finetuned needs the fine-tune's checkpoint: model.checkpoint=RUN_DIR/best.ckpt "
            "(or +finetuned_checkpoint=RUN_DIR/best.ckpt in a sweep), written by cbmir-finetune"
        )
    path = Path(checkpoint).expanduser()
    spec = read_spec(path, trust=trust_checkpoint)
    extractor = build_from_spec(spec)
    report = load_into(
        extractor, path, label=f"fine-tuned extractor {spec['name']!r}", trust=trust_checkpoint
    )
    extractor.weights = weights_identity(path)
    if sha256 and sha256 != extractor.weights:
        raise CheckpointError(
            f"{path} changed while the job started ({sha256} -> {extractor.weights})"
        )
    if name:
        extractor.name = str(name)
    log.info("loaded %s from %s (key prefix %r)", extractor.name, path, report["prefix"])
    return extractor


def checkpoint_info(path: object, field: str = "name") -> str | None:
    """For the config: the `name` stored in a fine-tune checkpoint ("finetuned" when there is
    none or it is unreadable: the loader reports the real error), or the file's `sha256`
    (None without a file). Cached per (path, mtime, size): resolvers run many times."""
    if field not in ("name", "sha256"):
        raise ConfigError(f"cbmir_checkpoint field must be name or sha256, not {field!r}")
    default = "finetuned" if field == "name" else None
    if path is None or str(path) in ("", "None", "null"):
        return default
    p = Path(str(path)).expanduser()
    try:
        stat = p.stat()
    except OSError:
        return default
    if not p.is_file():
        return default
    if field == "sha256":  # not cached by (mtime, size) here: that misses in-place rewrites
        return weights_identity(p)
    return _cached_info(str(p.resolve()), stat.st_mtime_ns, stat.st_size, field) or default


@functools.lru_cache(maxsize=64)
def _cached_info(path: str, mtime_ns: int, size: int, field: str) -> str | None:
    try:
        return str(read_spec(path).get("name") or "") or None
    except CheckpointError:
        return None
