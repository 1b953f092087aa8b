"""Random weights (`pretrained=false`) that see the whole image and are a pure function of a seed.

Offline runs, tests and smoke sweeps embed with random weights, so those weights must exercise
the image. The libraries' own random initialisations are tuned for training from scratch, not
for frozen features, and some make a network nearly a constant function:

- timm ResNets (and RegNet, ResNetV2, CSPNet, byobnet ...) zero the last batch-norm scale (or
  conv) of every residual block (`zero_init_last`); open_clip's ModifiedResNet zeroes `bn3`.
  Every residual branch then adds nothing, and a ResNet's embedding depends only on a corner of
  the input.
- Layer scale (`init_values=1e-5` in UNI, Virchow, DINOv2; ConvNeXt's 1e-6) scales every
  residual branch down to almost nothing, so a ViT's class token is nearly the same vector for
  every image.

`build_random` therefore builds the network under its own seed (in a forked RNG: nothing drawn
from torch's global generator before or after changes the weights, and the caller's generator
is left as it was) and then `see_whole_image` switches those shortcuts off: zero normalisation
scales become 1, constant layer-scale vectors become 1 (a plain residual block). `INIT_SCHEME`
names that recipe; it joins the extractor identity (and so the embedding-store key) with the
seed, so another scheme or seed never reuses embeddings.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from cbmir.config import is_int
from cbmir.errors import ConfigError

log = logging.getLogger(__name__)

#: name and version of the recipe below; change it whenever the weights it gives change
INIT_SCHEME = "cbmir-full-image-v1"
#: a layer-scale vector at or below this constant is a "start as identity" init, not a design
LAYER_SCALE_MAX = 0.1
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

M = TypeVar("M", bound=nn.Module)


def check_seed(seed: Any) -> int:
    """The seed random weights are drawn from: an integer, or a clear error (a missing seed
    would give unreproducible weights under one store key)."""
    if not is_int(seed):
        raise ConfigError(
            f"random weights (model.pretrained=false) need an integer seed, got {seed!r}: "
            "set seed=<int> (or model.seed=<int>)"
        )
    return int(seed)


def random_identity(seed: int, *libraries: str, **extra: Any) -> dict[str, Any]:
    """Identity fields of random weights: they are a function of the architecture, the init
    code (this scheme, torch's generator and the `libraries` that build the network: their
    versions) and the seed. `extra`: anything else that changes the draws (a second builder)."""
    versions = {"torch": torch.__version__.split("+")[0]}
    for name in libraries:
        versions[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
    return {"init": INIT_SCHEME, "seed": check_seed(seed), "built_with": versions, **extra}


def build_random(factory: Callable[[], M], seed: int) -> M:
    """`factory()` seeded with `seed` in a forked RNG, then `see_whole_image`."""
    seed = check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    see_whole_image(model)
    return model


def see_whole_image(model: nn.Module) -> nn.Module:
    """Undo the initialisations that make a random network ignore its input (in place, no RNG):
    zero normalisation scales -> 1, small constant layer-scale vectors -> 1."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _NORMS) and _is_constant(module.weight, 0.0):
                module.weight.fill_(1.0)
        for name, param in model.named_parameters():
            if _is_layer_scale(name, param):
                param.fill_(1.0)
            elif param.ndim >= 2 and not param.any():
                log.warning("random init left %s all zeros: that layer ignores its input", name)
    return model


def _is_layer_scale(name: str, param: torch.Tensor) -> bool:
    """timm / open_clip `LayerScale(2d).gamma`, ConvNeXt `gamma`, BEiT / EVA `gamma_1`, ..."""
    leaf = name.rsplit(".", 1)[-1]
    if param.ndim != 1 or not leaf.startswith("gamma") or not param.numel():
        return False
    value = float(param.flatten()[0])
    return 0.0 <= value <= LAYER_SCALE_MAX and _is_constant(param, value)


def _is_constant(param: torch.Tensor | None, value: float) -> bool:
    return param is not None and param.numel() > 0 and bool((param == value).all())


def region_sensitivity(
    embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, grid: int = 4
) -> np.ndarray:
    """How much the embedding moves when one region of the image changes: for each image and
    each cell of a `grid` x `grid` partition of it, the cell is inverted (255 - pixel) and the
    relative change `|e' - e| / |e|` recorded. Returns [n_images, grid * grid]; a value at float
    noise (< ~1e-6) means that region is invisible to the extractor."""
    images = images.to(torch.uint8)
    base = embed(images).double()
    changes = []
    for cell in grid_cells(images.shape[-2:], grid):
        edited = images.clone()
        edited[..., cell[0], cell[1]] = 255 - edited[..., cell[0], cell[1]]
        moved = embed(edited).double()
        changes.append((moved - base).norm(dim=1) / base.norm(dim=1).clamp_min(1e-12))
    return torch.stack(changes, dim=1).numpy()


def grid_cells(shape: Sequence[int], grid: int) -> list[tuple[slice, slice]]:
    """Row/column slices of a `grid` x `grid` partition of an image of `shape` (H, W)."""
    height, width = int(shape[0]), int(shape[1])
    rows = np.linspace(0, height, grid + 1).round().astype(int)
    cols = np.linspace(0, width, grid + 1).round().astype(int)
    return [
        (slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1]))
        for i in range(grid)
        for j in range(grid)
    ]
