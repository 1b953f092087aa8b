"""Load weights from a file into an extractor's network, offline, with errors that say what
did not fit.

One loader for every family (timm, open_clip, CONCH, MedCLIP):

- formats: `.safetensors`, a torch state dict (`.pt`, `.pth`, `.bin`), or a Lightning `.ckpt`
  (its `state_dict`); nested `{"state_dict": ...}`, `{"model": ...}` wrappers are unwrapped.
- prefixes: a fine-tuned extractor saved by Lightning has keys such as
  `extractor.model.blocks.0...`, a DDP or compiled one `module.` / `_orig_mod.`, a CLIP
  checkpoint `visual.`: the prefix whose removal matches the most of the network's own keys is
  stripped, and keys outside it (a text tower, a training head) are left out.
- a family-specific `convert` maps foreign layouts (timm's own `checkpoint_filter_fn`, MedCLIP's
  Hugging Face Swin names) onto the network's.
- anything still missing, unexpected or of the wrong shape raises `CheckpointError` listing the
  first keys of each kind; an unreadable file `UnreadableWeightsError`.
- safety: torch files are unpickled with `weights_only=True` (plus a few plain-data types that
  Lightning checkpoints hold); a file that needs more raises `UntrustedCheckpointError` unless
  the caller trusts it (`model.trust_checkpoint=true`), since unpickling can run any code.

`weights_identity(path)` is the file's sha256 (cached per file version, see `weights_file`): it
goes into the extractor's `identity()` and so into the embedding-store key, so a new checkpoint
never reuses old embeddings.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbmir.errors import CbmirError, reason

from . import weights_file

log = logging.getLogger(__name__)

#: how many keys of each kind an error message lists
SHOW_KEYS = 12
#: wrappers a checkpoint dict may hold the state dict under (Lightning, common training loops)
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
#: deepest prefix (in dotted components) tried when matching keys
MAX_PREFIX_DEPTH = 4

StateDict = dict[str, torch.Tensor]


class CheckpointError(CbmirError):
    """A weights file that cannot be read or does not fit the network."""


class UnreadableWeightsError(CheckpointError):
    """A weights file that is missing, truncated or not a weights file at all."""


class UntrustedCheckpointError(CheckpointError):
    """A torch file that holds pickled objects beyond tensors and plain data."""


TRUST_HELP = (
    "Unpickling it can run arbitrary code. Load it only if you trust where it came from, with "
    "model.trust_checkpoint=true, or save its state dict alone (torch.save(model.state_dict(), "
    "...) or safetensors) and load that."
)


@contextlib.contextmanager
def hint_on_error(hint: str) -> Iterator[None]:
    """Append `hint` (e.g. how to drop a broken cached file) to any CheckpointError."""
    try:
        yield
    except CheckpointError as exc:
        raise type(exc)(f"{exc} {hint}") from None


# -- reading ---------------------------------------------------------------------------------
def read_state_dict(path: str | Path, trust: bool = False) -> StateDict:
    """Tensors of a weights file, unwrapped from Lightning / training-loop containers.

    Torch files are memory-mapped where possible, so a multi-GB CLIP checkpoint whose text
    tower is dropped never has that tower read into memory. They are read with
    `weights_only=True` (tensors, plain data and the few types in `safe_types()`); a file
    needing more is refused unless `trust` (see `load_torch_file`).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UnreadableWeightsError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # a core dependency

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:
            raise UnreadableWeightsError(
                f"could not read {path} as safetensors ({reason(exc)}): the file is truncated "
                "or corrupt"
            ) from exc
    return _unwrap(load_torch_file(path, trust=trust), path)


def safe_types() -> list[Any]:
    """Plain-data types that Lightning checkpoints hold in their hyper-parameters, allowed for
    `weights_only` loading: none of them runs code when unpickled."""
    import argparse
    import pathlib

    # Lightning saves hyper-parameters as a plain dict (`dict(model.hparams)`); its
    # AttributeDict, a dict subclass, could not be rebuilt by the weights_only unpickler anyway
    return [
        argparse.Namespace,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
    ]


def load_torch_file(path: str | Path, trust: bool = False) -> Any:
    """`torch.load` that never unpickles arbitrary objects unless `trust` is set.

    `weights_only=True` first (memory-mapped when the file is in the zip format); a file that
    needs more is refused with `UntrustedCheckpointError` naming the file, the types it holds
    and the opt-in `model.trust_checkpoint=true`; only then is `weights_only=False` used.
    """
    path = Path(path).expanduser()
    error: Exception | None = None
    with torch.serialization.safe_globals(safe_types()):
        for kwargs in ({"mmap": True}, {}):  # mmap needs the zip format
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, **kwargs)
            except Exception as exc:
                error = exc
    assert error is not None
    if not _refused_by_weights_only(error):
        raise UnreadableWeightsError(
            f"could not read {path} as a torch checkpoint ({reason(error)}): the file is "
            "truncated or corrupt, or not a state dict (.pt/.pth/.bin), a Lightning .ckpt or a "
            ".safetensors file."
        )
    if not trust:
        raise UntrustedCheckpointError(
            f"{path} holds pickled objects beyond tensors and plain data"
            f"{_unsafe_types(path)}. " + TRUST_HELP
        )
    log.warning("%s: loading with weights_only=False (model.trust_checkpoint=true)", path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UnreadableWeightsError(f"could not read {path} ({reason(exc)})") from exc


#: what torch's weights_only unpickler says when a well-formed file holds objects it refuses
#: (a garbage file fails otherwise: "Unsupported operand", a zip error, ...)
_REFUSALS = (
    "unsupported global",
    "reduce for unrecognized function",
    "can only ",  # create / build / setitems / append: an object or container it does not allow
)


def _refused_by_weights_only(exc: BaseException) -> bool:
    """True when torch read the file but its weights_only unpickler refused an object."""
    text = str(exc).lower()
    return isinstance(exc, pickle.UnpicklingError) and any(r in text for r in _REFUSALS)


#: what a converter raises on a state dict it cannot map (a missing key, a tensor of another
#: shape); TypeError / AttributeError are bugs in the converter and keep their traceback
CONVERT_ERRORS = (KeyError, IndexError, ValueError, RuntimeError)


def _unsafe_types(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, pickle.UnpicklingError):  # legacy (non-zip) files: none
        return ""
    shown = [
        n for n in names if n not in {f"{t.__module__}.{t.__qualname__}" for t in safe_types()}
    ]
    return f" ({', '.join(shown[:SHOW_KEYS])})" if shown else ""


def _unwrap(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping | nn.Module)), None
        )
        if inner is None:
            break
        obj = inner.state_dict() if isinstance(inner, nn.Module) else inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path} holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:SHOW_KEYS]))})"
        )
    return tensors


# -- matching --------------------------------------------------------------------------------
def strip_prefix(
    state_dict: Mapping[str, torch.Tensor], expected: Iterable[str]
) -> tuple[StateDict, str]:
    """Remove the key prefix that makes the checkpoint match the network best.

    Returns the (possibly reduced) state dict and the prefix removed ("" for none). Keys not
    under the chosen prefix are dropped: they belong to other parts of a bigger model.
    """
    expected = set(expected)
    best_prefix, best_score = "", len(expected.intersection(state_dict))
    candidates: set[str] = set()
    for key in state_dict:
        parts = key.split(".")
        for depth in range(1, min(MAX_PREFIX_DEPTH, len(parts) - 1) + 1):
            candidates.add(".".join(parts[:depth]) + ".")
    for prefix in sorted(candidates, key=lambda p: (p.count("."), p)):
        n = len(prefix)
        score = sum(1 for k in state_dict if k.startswith(prefix) and k[n:] in expected)
        if score > best_score:
            best_prefix, best_score = prefix, score
    if not best_prefix:
        return dict(state_dict), ""
    n = len(best_prefix)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(best_prefix)}, best_prefix


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, key) for p in patterns)


def _listing(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOW_KEYS])
    more = f" (+{len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
    return f"{len(keys)} {kind}: {shown}{more}"


def load_into(
    module: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    label: str,
    convert: Callable[[StateDict], StateDict] | None = None,
    ignore_unexpected: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
    trust: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint file (or a state dict) into `module`, strictly.

    `convert` maps a foreign layout onto the module's own key names; `ignore_unexpected` /
    `ignore_missing` are regexes of keys that may be absent or extra by design (e.g. a CLIP
    text tower when only the image tower is built); `trust` allows unpickling objects (see
    `load_torch_file`). Returns a small report (prefix stripped, keys ignored).
    """
    where = str(source) if isinstance(source, str | Path) else "the given state dict"
    sd = read_state_dict(source, trust) if isinstance(source, str | Path) else dict(source)
    own = module.state_dict()
    expected = set(own)
    sd, prefix = strip_prefix(sd, expected)
    if convert is not None and any(_misfits(sd, own, ignore_unexpected, ignore_missing)):
        # only foreign layouts are converted: some filters (timm's Swin) are not idempotent
        try:
            sd = convert(sd)
        except CONVERT_ERRORS as exc:  # a layout the converter cannot map; a bug surfaces
            raise CheckpointError(
                f"{where} could not be converted for {label} ({type(exc).__name__}: {exc})"
            ) from exc
        sd, prefix2 = strip_prefix(sd, expected)
        prefix = prefix + prefix2
    missing, unexpected, shapes = _misfits(sd, own, ignore_unexpected, ignore_missing)
    if missing or unexpected or shapes:
        parts = [
            f"{where} does not fit {label}"
            + (f" (after removing the key prefix {prefix!r})" if prefix else "")
            + ":"
        ]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if shapes:
            parts.append(_listing("keys of another shape (checkpoint vs network)", shapes))
        parts.append(
            "Is it a checkpoint of the same architecture (model.model_name and model_kwargs)?"
        )
        raise CheckpointError("\n  ".join(parts))
    ignored = set(sd) - expected  # all of them match ignore_unexpected by now
    # missing-but-ignored keys keep the module's own values
    sd = {**own, **{k: v for k, v in sd.items() if k not in ignored}}
    module.load_state_dict(sd, strict=True)
    return {"prefix": prefix, "ignored": len(ignored)}


def _misfits(
    sd: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    ignore_unexpected: Iterable[str],
    ignore_missing: Iterable[str],
) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, keys of another shape) of `sd` against `own`, each
    sorted; keys matching `ignore_missing` / `ignore_unexpected` are not counted."""
    missing = sorted(k for k in own.keys() - sd.keys() if not _matches(k, ignore_missing))
    unexpected = sorted(k for k in sd.keys() - own.keys() if not _matches(k, ignore_unexpected))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(own.keys() & sd.keys())
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, shapes


def weights_identity(path: str | Path) -> str:
    """`sha256:<hex>` of a local weights file: part of the embedding-store key (hashed once
    per file version, see `weights_file`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UnreadableWeightsError(f"checkpoint file not found: {path}")
    return "sha256:" + weights_file.sha256(path)


def timm_filter(model: nn.Module) -> Callable[[StateDict], StateDict] | None:
    """timm's own `checkpoint_filter_fn` for a model's family (original-format weights,
    position-embedding resampling), or None."""
    import sys

    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return None if fn is None else lambda sd: fn(sd, model)
