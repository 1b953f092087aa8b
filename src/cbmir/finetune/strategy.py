"""Which backbone parameters a fine-tune trains: all, the last block, or none (head only).

"Last block" has to mean the same thing for a ResNet, a DenseNet, a ConvNeXt and a ViT:

1. the backbone's parameters are split into ordered groups: timm's own `group_matcher`
   (stem, stage 1..n, trailing norm) when the network is a timm model, otherwise the children
   of its longest stack of identical blocks (a transformer's `blocks` / `resblocks`) with
   everything before and after as groups of their own;
2. parameters the embedding never reaches (a VGG `pre_logits` bypassed by average pooling) are
   dropped, found by one backward pass on a dummy batch;
3. from the end, trailing groups made only of normalisation layers (DenseNet's `norm5`,
   ConvNeXt's `head.norm`) are taken together with the first real block group before them.

Frozen normalisation layers stay in eval mode during training, so their running statistics
remain the pretrained ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from cbmir.config import check_choice
from cbmir.errors import ConfigError
from cbmir.extractors.base import Extractor

from .extractor import FineTunedExtractor
from .settings import STRATEGIES

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def apply_strategy(
    extractor: FineTunedExtractor, strategy: str, image_shape: tuple[int, ...]
) -> list[nn.Module]:
    """Set `requires_grad` on the backbone; return the modules to keep in eval mode."""
    check_choice(strategy, STRATEGIES, "finetune.strategy")
    base = extractor.base
    if extractor.head is not None:
        extractor.head.requires_grad_(True)
    if strategy == "full":
        base.requires_grad_(True)
        return []
    base.requires_grad_(False)
    if strategy == "projection_head":
        if extractor.head is None:
            raise ConfigError("finetune.strategy=projection_head needs a projection head")
        return [base]
    names = last_block_parameters(base, image_shape)
    for name, param in base.named_parameters():
        param.requires_grad_(name in names)
    return frozen_norm_layers(base)


def frozen_norm_layers(module: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in module.modules()
        if isinstance(m, NORM_TYPES) and not any(p.requires_grad for p in m.parameters())
    ]


def last_block_parameters(base: Extractor, image_shape: tuple[int, ...]) -> set[str]:
    """Names (in `base.named_parameters()`) of the last block and anything after it."""
    used = used_parameters(base, image_shape)
    groups = [[n for n in g if n in used] for g in parameter_groups(base)]
    groups = [g for g in groups if g]
    if not groups:
        raise ConfigError(
            f"finetune.strategy=last_block: no trainable block found in {base.name}; "
            "use strategy=full or projection_head"
        )
    norm_params = _norm_parameter_names(base)
    chosen: set[str] = set()
    for group in reversed(groups):
        chosen.update(group)
        if not set(group) <= norm_params:
            break
    return chosen


def parameter_groups(base: nn.Module) -> list[list[str]]:
    """Ordered groups of parameter names, front of the network first."""
    own = [n for n, _ in base.named_parameters()]
    timm_model, prefix = _find_timm_model(base)
    if timm_model is not None:
        from timm.models._manipulate import group_parameters

        grouped = group_parameters(timm_model, timm_model.group_matcher(coarse=True))
        groups = [[prefix + n for n in grouped[k]] for k in sorted(grouped)]
        covered = {n for g in groups for n in g}
        rest = [n for n in own if n not in covered]  # parameters outside the timm model
        return groups + ([rest] if rest else [])
    return _stack_groups(base, own)


def _find_timm_model(base: nn.Module) -> tuple[nn.Module | None, str]:
    for name, module in base.named_modules():
        if callable(getattr(module, "group_matcher", None)) and type(module).__module__.startswith(
            "timm."
        ):
            return module, f"{name}." if name else ""
    return None, ""


def _stack_groups(base: nn.Module, own: list[str]) -> list[list[str]]:
    """Groups from the longest stack of same-typed blocks: before, each block, after."""
    best: tuple[int, str, nn.Module] | None = None
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and any(True for _ in module.parameters()):
                n_params = sum(p.numel() for p in module.parameters())
                if best is None or n_params > best[0]:
                    best = (n_params, name, module)
    if best is None:
        return [own]
    _, stack_name, stack = best
    block_of: dict[str, int] = {}
    for i, (child_name, child) in enumerate(stack.named_children()):
        for pname, _ in child.named_parameters():
            block_of[f"{stack_name}.{child_name}.{pname}"] = i
    groups: OrderedDict[str, list[str]] = OrderedDict()
    seen_stack = False
    for n in own:
        if n in block_of:
            seen_stack = True
            groups.setdefault(f"block{block_of[n]}", []).append(n)
        else:
            groups.setdefault("after" if seen_stack else "before", []).append(n)
    return list(groups.values())


def _norm_parameter_names(base: nn.Module) -> set[str]:
    names = set()
    for mname, module in base.named_modules():
        if isinstance(module, NORM_TYPES):
            names.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters())
    return names


def used_parameters(base: Extractor, image_shape: tuple[int, ...]) -> set[str]:
    """Parameters that receive a gradient from the embedding of a dummy batch (eval mode, so
    running statistics are untouched)."""
    was_training = base.training
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    device = next((p.device for p in base.parameters()), torch.device("cpu"))
    base.eval()
    try:
        for p in base.parameters():
            p.requires_grad_(True)
            p.grad = None
        images = torch.randint(0, 256, (2, *image_shape), dtype=torch.uint8, device=device)
        with torch.enable_grad():
            base.embed(base.preprocess(images)).float().sum().backward()
        return {n for n, p in base.named_parameters() if p.grad is not None}
    finally:
        for n, p in base.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])
        base.train(was_training)


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
