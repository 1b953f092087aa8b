"""Any timm image model as a frozen extractor.

The paper's CNNs were Keras ImageNet models with `include_top=False, pooling='avg'`: the
global average of the last convolutional feature map. timm's `num_classes=0` does not always
give that (VGG's head returns 4096-d fc7 features), so `pool="avg"` averages the output of
`forward_features` itself.

Foundation models published as timm weights on the hub (UNI, UNI2-h, Virchow, Virchow2) are
built offline from their published timm arguments (`model_name` + `model_kwargs`) and their
weights loaded from `hf_hub_id` (gated: `HF_TOKEN`) or from a local `checkpoint`, through
`cbmir.extractors.checkpoint` (clear errors for mismatched keys).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from cbmir.config import to_plain as _plain
from cbmir.errors import DOWNLOAD_ERRORS, CbmirError, reason

from . import hub
from .base import Extractor
from .checkpoint import (
    CheckpointError,
    hint_on_error,
    load_into,
    read_state_dict,
    timm_filter,
    weights_identity,
)
from .preprocessing import ModelTransform
from .random_init import build_random, random_identity
from .weights_file import file_identity

POOLS = ("avg", "head", "cls", "cls+mean")
#: timm keyword arguments whose string values name a class or function ("timm.layers.SwiGLUPacked")
CALLABLE_KWARGS = (
    "mlp_layer",
    "act_layer",
    "norm_layer",
    "embed_layer",
    "block_fn",
    "fc_norm_layer",
)
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TimmExtractor(ModelTransform, Extractor):
    """`model_name` is a timm name with its weight tag (e.g. `resnet50.tv_in1k`).

    pool:
      - `avg`: global average of the last feature map (CNNs; the paper's Keras pooling).
      - `head`: timm's own pre-logits pooling (`forward_head(pre_logits=True)`).
      - `cls`: the class token of a ViT; `cls+mean`: class token concatenated with the mean
        of the patch tokens, register tokens skipped (Virchow's recipe).

    Weights, first match wins: `checkpoint` (a local file, no network) > `hf_hub_id` (a hub
    repository holding timm weights for this architecture, e.g. `MahmoodLab/UNI`) > timm's
    own weights for the tag in `model_name` > random (`pretrained=false`): drawn from `seed`
    with an init whose features depend on every pixel (`random_init`), seed and scheme in the
    identity; `seed` does nothing for loaded weights.

    Preprocessing: `input_size="auto"` is timm's eval transform for the weights (size,
    interpolation, crop_pct, mean/std from `pretrained_cfg`). Otherwise by default the base class's (stretch to `input_size`, or the image's own
    size raised to `min_size`: the paper's CNN protocol). With `resize_mode` set
    (`shortest`, `squash`, `pad`) it is the model's eval transform (see `preprocessing`).
    `mean`/`std` default to the timm weights' own statistics.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        name: str | None = None,
        pool: str = "avg",
        input_size: int | str | None = None,
        min_size: int | None = 32,
        interpolation: str = "bilinear",
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        hf_hub_id: str | None = None,
        gated: bool = False,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        resize_mode: str | None = None,
        crop_pct: float | None = 1.0,
        trust_checkpoint: bool = False,
        seed: int = 0,
    ) -> None:
        import timm

        if pool not in POOLS:
            raise CbmirError(f"unknown pool {pool!r} for {model_name}; valid: {', '.join(POOLS)}")
        self.model_name = model_name
        self.pretrained = bool(pretrained)
        self.pool = pool
        self.model_kwargs = _plain(model_kwargs or {})
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.hf_hub_id = hf_hub_id
        kwargs = _resolve_callables(self.model_kwargs)
        label = f"timm model {model_name!r}"

        if self.checkpoint:
            weights = weights_identity(self.checkpoint)
            model = _create_timm_model(model_name, False, kwargs)
            _load_timm_checkpoint(model, self.checkpoint, label, trust=trust_checkpoint)
        elif self.pretrained and hf_hub_id:
            hub_file = hub.fetch(
                hf_hub_id,
                HUB_WEIGHT_FILES,
                gated=gated,
                what=f"the weights of {name or model_name}",
            )
            weights = hub_file.identity()
            model = _create_timm_model(model_name, False, kwargs)
            with hint_on_error(hub.cache_hint(hub_file.path)):
                _load_timm_checkpoint(
                    model,
                    hub_file.path,
                    f"{label} with weights from {hf_hub_id}",
                    trust=trust_checkpoint,
                )
        elif self.pretrained:
            path, weights = _timm_weights_file(model_name, gated)
            model = _create_timm_model(model_name, True, kwargs, gated=gated, weights_file=path)
        else:
            model = _create_random_timm_model(model_name, kwargs, seed)
            weights = "random"
            self.random_init = random_identity(seed, "timm")

        cfg = getattr(model, "pretrained_cfg", {}) or {}
        if input_size == "auto":
            # timm's own eval transform for these weights (resolve_data_config + create_transform)
            input_size = int(
                (cfg.get("test_input_size") or cfg.get("input_size") or (3, 224, 224))[-1]
            )
            interpolation = cfg.get("interpolation", "bicubic")
            if interpolation not in ("bilinear", "bicubic", "nearest"):
                interpolation = "bicubic"
            resize_mode = resize_mode or (
                "squash" if cfg.get("crop_mode") == "squash" else "shortest"
            )
            crop_pct = cfg.get("test_crop_pct") or cfg.get("crop_pct") or 1.0
        elif isinstance(input_size, str):
            raise CbmirError(f"input_size must be an integer, null or 'auto', got {input_size!r}")
        super().__init__(
            input_size=input_size,
            min_size=min_size,
            mean=tuple(mean) if mean is not None else tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(std) if std is not None else tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=interpolation,
        )
        self._model_transform = resize_mode is not None
        if self._model_transform:
            if input_size is None:
                raise CbmirError(f"resize_mode={resize_mode!r} needs input_size for {model_name}")
            self._set_transform(resize_mode or "shortest", crop_pct)
        self.name = name or model_name.split(".")[0]
        self.in_chans = int(getattr(model, "in_chans", 3) or 3)
        self.model = model
        self.weights = weights
        self._num_features = int(model.num_features)
        self._timm_version = timm.__version__

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if self._model_transform:
            return ModelTransform.preprocess(self, images)
        return Extractor.preprocess(self, images)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if self.pool == "avg":
            if feats.ndim == 4:  # [B, C, h, w] conv map
                return feats.mean(dim=(2, 3))
            if feats.ndim == 3:  # [B, T, C] tokens: average them
                return feats.mean(dim=1)
            return feats
        if self.pool == "head":
            return self.model.forward_head(feats, pre_logits=True)
        prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        cls = feats[:, 0]
        if self.pool == "cls":
            return cls
        return torch.cat([cls, feats[:, prefix:].mean(dim=1)], dim=1)

    def output_dim(self, image_shape: tuple[int, ...] | None = None) -> int:
        return self._num_features * (2 if self.pool == "cls+mean" else 1)

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident.update(
            model_name=self.model_name,
            pretrained=self.pretrained,
            pool=self.pool,
            model_kwargs=self.model_kwargs,
            weights=self.weights,
            timm=self._timm_version,
        )
        if self._model_transform:
            ident.update(self.transform_identity())
        return ident


def _resolve_callables(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`"timm.layers.SwiGLUPacked"` -> the class, for the keys that take a layer type."""
    out = dict(kwargs)
    for key in CALLABLE_KWARGS:
        value = out.get(key)
        if isinstance(value, str) and "." in value:
            module_name, _, attr = value.rpartition(".")
            try:
                out[key] = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise CbmirError(f"model_kwargs.{key}={value!r} is not an importable name") from exc
    return out


def _classifier_patterns(model: torch.nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    names = cfg.get("classifier") or "head"
    names = [names] if isinstance(names, str) else list(names)
    return [rf"^{re.escape(n)}\." for n in names] + [r"^head\.", r"^fc\.", r"^classifier\."]


def _load_timm_checkpoint(
    model: torch.nn.Module, path: str, label: str, trust: bool = False
) -> None:
    load_into(
        model,
        path,
        label=label,
        convert=timm_filter(model),
        # the extractor drops timm's classifier: a fine-tuned head in the file is not an error
        ignore_unexpected=_classifier_patterns(model),
        trust=trust,
    )


def _timm_weights_file(model_name: str, gated: bool) -> tuple[str, dict[str, Any]]:
    """The local file of timm's own weights for `model_name` (fetched into the hub or torch
    cache if needed) and its identity, so the store key names the weights timm loads."""
    import timm

    what = f"timm weights {model_name!r}"
    if model_name.startswith("hf-hub:"):
        hub_file = hub.fetch(model_name[7:], HUB_WEIGHT_FILES, gated=gated, what=what)
        return hub_file.path, hub_file.identity()
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as exc:  # a tag the architecture does not have
        raise CbmirError(f"timm: {exc} Known: {', '.join(_tags(model_name))}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise CbmirError(
            f"timm has no pretrained weights for {model_name!r} (known: "
            f"{', '.join(_tags(model_name)) or 'none'}); use model.checkpoint=/path/to/weights "
            "or model.pretrained=false"
        )
    tag = model_name if "." in model_name else f"{model_name}.{cfg.tag}"
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        repo, _, revision = cfg.hf_hub_id.partition("@")
        hub_file = hub.fetch(repo, files, gated=gated, revision=revision or None, what=what)
        return hub_file.path, {"timm_tag": tag, **hub_file.identity()}
    return _url_weights_file(cfg.url, tag)


def _url_weights_file(url: str, tag: str) -> tuple[str, dict[str, Any]]:
    """timm weights published at a URL only: torch hub's cached copy (downloaded once)."""
    from timm.models._hub import download_cached_file, get_cache_dir

    cached = Path(get_cache_dir()) / Path(urlparse(url).path).name
    if not cached.is_file() and (hub.offline() or not hub.reachable()):
        raise hub.HubError(
            f"timm weights {tag!r} are not cached at {cached} and cannot be downloaded "
            f"(offline) from {url}. " + hub.OFFLINE_HELP
        )
    try:
        path = download_cached_file(url, check_hash=False, progress=False)
    except DOWNLOAD_ERRORS as exc:
        raise hub.HubError(
            f"could not download timm weights {tag!r} from {url} ({type(exc).__name__}). "
            + hub.OFFLINE_HELP
        ) from None
    return path, file_identity(path, source="url", url=url, timm_tag=tag)


def _tags(model_name: str) -> list[str]:
    import timm

    return timm.list_pretrained(f"{model_name.split('.')[0]}.*")[:10]


def _broken_weights_error(path: str, model_name: str, exc: Exception) -> CheckpointError:
    """timm failed on a weights file: unreadable, or of another architecture. Either way the
    file is named, with how to drop it from the cache (not a hint about the network)."""
    try:
        read_state_dict(path)
    except CheckpointError as unreadable:
        return type(unreadable)(f"{unreadable} {hub.cache_hint(path)}")
    return CheckpointError(
        f"timm could not build {model_name!r} with the weights file {path} "
        f"({reason(exc)}). Does the file hold this architecture "
        f"(model.model_name, model.model_kwargs)? If not, it is a broken copy: "
        f"{hub.cache_hint(path)}"
    )


def _create_random_timm_model(
    model_name: str, kwargs: dict[str, Any], seed: int
) -> torch.nn.Module:
    """Random weights from `seed`, built with `zero_init_last=False` where the architecture
    takes it (ResNet, RegNet, ResNetV2, ...: timm's default zeroes every residual branch)."""
    try:
        return build_random(
            lambda: _create_timm_model(model_name, False, {"zero_init_last": False, **kwargs}),
            seed,
        )
    except CbmirError as exc:
        cause = exc.__cause__
        if not (isinstance(cause, TypeError) and "zero_init_last" in str(cause)):
            raise
    # this architecture has no zero_init_last (ViT, DenseNet, VGG, EfficientNet, ...)
    return build_random(lambda: _create_timm_model(model_name, False, kwargs), seed)


def _create_timm_model(
    model_name: str,
    pretrained: bool,
    kwargs: dict[str, Any],
    gated: bool = False,
    weights_file: str | None = None,
) -> torch.nn.Module:
    import timm

    kwargs = {"num_classes": 0, **kwargs}
    schema, base = (
        ("hf-hub", model_name[7:])
        if model_name.startswith("hf-hub:")
        else (None, model_name.split(".")[0])
    )
    if schema is None and base not in timm.list_models():
        close = timm.list_models(f"*{base[:6]}*")[:10]
        raise CbmirError(f"timm has no model {base!r}; similar names: {', '.join(close) or 'none'}")
    # an hf-hub: architecture comes from the hub's config.json: fail fast when offline
    if schema == "hf-hub" and not hub.offline() and not hub.reachable():
        raise hub.HubError(
            f"timm model {model_name!r} needs its config from the Hugging Face hub, which "
            f"cannot be reached.\nModel page: {hub.model_page(base)}\n"
            + (hub.TOKEN_HELP + "\n" if gated else "")
            + "Build the architecture offline instead: model_name=<timm architecture> "
            "model_kwargs={...} with model.checkpoint=/path/to/weights."
        )
    # timm loads exactly the file whose identity keys the store ("source" off: not the hub)
    overlay = {"file": weights_file, "source": ""} if pretrained and weights_file else None
    try:
        return timm.create_model(
            model_name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs
        )
    except CbmirError:
        raise
    except Exception as exc:  # network, missing weight tag, gated repo, bad kwargs
        if pretrained and weights_file:
            raise _broken_weights_error(weights_file, model_name, exc) from None
        if not pretrained and schema is None:
            raise CbmirError(
                f"could not build timm model {model_name!r} with {kwargs}: {reason(exc)}"
            ) from exc
        page = hub.model_page(base) if schema == "hf-hub" else "https://huggingface.co/timm"
        raise CbmirError(
            f"could not load pretrained weights for timm model {model_name!r} "
            f"({reason(exc)}).\n"
            f"Model page: {page}\n"
            "Weights come from the Hugging Face hub: check the network (or HF_HUB_OFFLINE with a "
            "filled cache), the weight tag and, for gated models, HF_TOKEN. " + hub.OFFLINE_HELP
        ) from exc
