"""The image tower of any open_clip model (OpenCLIP ViT-g-14, BiomedCLIP, ...).

Only the vision tower is built (`open_clip.model._build_vision_tower`): the text tower of
ViT-g-14 alone is ~350M parameters, and BiomedCLIP's needs `transformers` and a second hub
download; neither is used for image retrieval. Embedding = `model.encode_image(x)`, i.e.
`visual(x)`, optionally L2-normalised.

Architecture config, first match: `model_config` (a local `open_clip_config.json`), a copy
shipped in this package (BiomedCLIP), open_clip's built-in configs (`ViT-g-14`), the hub's
`open_clip_config.json` for `hf-hub:` names. Weights: `checkpoint` (local file) > `weights`
(an open_clip pretrained tag such as `laion2b_s34b_b88k`, or `hf-hub:org/repo`; default for an
`hf-hub:` model is its own repository) > random (`pretrained=false`: drawn from `seed` with an
init that sees the whole image, see `random_init`). A full CLIP checkpoint is fine: only its
`visual.*` tensors are read.
"""

from __future__ import annotations

import json
from copy import deepcopy
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbmir.errors import DOWNLOAD_ERRORS, CbmirError, ConfigError

from . import hub
from .base import Extractor
from .checkpoint import hint_on_error, load_into, weights_identity
from .preprocessing import ModelTransform
from .random_init import build_random, random_identity
from .weights_file import file_identity

HF_PREFIX = "hf-hub:"
#: open_clip configs shipped with cbmir for hub models, so their image tower builds offline
SHIPPED_CONFIGS = {
    "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224": "biomedclip_open_clip_config.json",
}
CLIP_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)


class ImageTower(nn.Module):
    """Holds `visual` under the same name as in a CLIP model, so CLIP checkpoints
    (`visual.*` keys) load without renaming."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


class OpenClipExtractor(ModelTransform, Extractor):
    """open_clip image features: `encode_image(x)`, L2-normalised when `normalize`."""

    def __init__(
        self,
        model_name: str,
        weights: str | None = None,
        pretrained: bool = True,
        name: str | None = None,
        normalize: bool = False,
        checkpoint: str | None = None,
        model_config: str | None = None,
        input_size: int | None = None,
        interpolation: str | None = None,
        resize_mode: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        gated: bool = False,
        trust_checkpoint: bool = False,
        seed: int = 0,
    ) -> None:
        import open_clip

        self.model_name = model_name
        self.pretrained = bool(pretrained)
        self.normalize = bool(normalize)
        self.checkpoint = str(checkpoint) if checkpoint else None
        hub_repo = model_name[len(HF_PREFIX) :] if model_name.startswith(HF_PREFIX) else None
        if weights is None and hub_repo:
            weights = f"{HF_PREFIX}{hub_repo}"
        self.weights_source = weights

        full_cfg = _model_config(model_name, model_config, gated)
        model_cfg = full_cfg.get("model_cfg", full_cfg)
        if "vision_cfg" not in model_cfg or "embed_dim" not in model_cfg:
            raise ConfigError(f"open_clip config of {model_name!r} has no vision_cfg/embed_dim")
        preprocess = _preprocess_cfg(full_cfg, model_name, weights)
        self._embed_dim = int(model_cfg["embed_dim"])
        vision_cfg = deepcopy(model_cfg["vision_cfg"])
        vision_cfg["timm_model_pretrained"] = False  # never fetch ImageNet weights for the trunk
        self._arch = {
            "embed_dim": self._embed_dim,
            "vision_cfg": vision_cfg,
            "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
        }

        def build_tower() -> ImageTower:
            return ImageTower(
                open_clip.model._build_vision_tower(
                    self._embed_dim, vision_cfg, quick_gelu=self._arch["quick_gelu"]
                )
            )

        random_weights = not self.checkpoint and not self.pretrained
        tower = build_random(build_tower, seed) if random_weights else build_tower()
        label = f"the image tower of open_clip {model_name!r}"
        if self.checkpoint:
            self.weights = weights_identity(self.checkpoint)
            _load_visual(tower, self.checkpoint, label, trust=trust_checkpoint)
        elif self.pretrained:
            if not weights:
                raise ConfigError(
                    f"open_clip model {model_name!r}: set model.weights to a pretrained tag "
                    f"({', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none known'}) "
                    "or hf-hub:org/repo, or model.checkpoint=/path, or model.pretrained=false"
                )
            path, self.weights = _download_weights(model_name, weights, gated)
            with hint_on_error(hub.cache_hint(path)):
                _load_visual(tower, path, f"{label} with weights {weights}", trust=trust_checkpoint)
        else:
            self.weights = "random"
            self.random_init = random_identity(seed, "open_clip", "timm")

        size = input_size or _image_size(vision_cfg)
        super().__init__(
            input_size=size,
            min_size=None,
            mean=tuple(mean if mean is not None else preprocess["mean"]),
            std=tuple(std if std is not None else preprocess["std"]),
            interpolation=interpolation or preprocess["interpolation"],
        )
        self._set_transform(resize_mode or preprocess["resize_mode"], 1.0)
        self.name = name or (hub_repo.split("/")[-1] if hub_repo else model_name)
        self.model = tower
        self._open_clip_version = open_clip.__version__

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.visual(x)
        if isinstance(features, tuple):  # towers configured with output_tokens
            features = features[0]
        return F.normalize(features, dim=-1) if self.normalize else features

    def output_dim(self, image_shape: tuple[int, ...] | None = None) -> int:
        return self._embed_dim

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident.update(self.transform_identity())
        ident.update(
            model_name=self.model_name,
            architecture=self._arch,
            weights=self.weights,
            normalize=self.normalize,
            open_clip=self._open_clip_version,
        )
        return ident


def shipped_config(repo_id: str) -> dict[str, Any] | None:
    filename = SHIPPED_CONFIGS.get(repo_id)
    if filename is None:
        return None
    text = resources.files("cbmir.extractors").joinpath("assets", filename).read_text("utf-8")
    return json.loads(text)


def _model_config(model_name: str, model_config: str | None, gated: bool) -> dict[str, Any]:
    import open_clip

    if model_config:
        path = Path(model_config).expanduser()
        if not path.is_file():
            raise ConfigError(f"model_config file not found: {path}")
        return json.loads(path.read_text("utf-8"))
    if model_name.startswith(HF_PREFIX):
        repo = model_name[len(HF_PREFIX) :]
        shipped = shipped_config(repo)
        if shipped is not None:
            return shipped
        hub_file = hub.fetch(
            repo, ("open_clip_config.json",), gated=gated, what=f"the open_clip config of {repo}"
        )
        return json.loads(Path(hub_file.path).read_text("utf-8"))
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        known = [
            m for m in open_clip.list_models() if model_name.split("-")[0].lower() in m.lower()
        ][:10]
        raise ConfigError(
            f"open_clip has no model {model_name!r}; similar: {', '.join(known) or 'none'} "
            "(or use hf-hub:org/repo, or model_config=/path/open_clip_config.json)"
        )
    return {"model_cfg": cfg}


def _preprocess_cfg(
    full_cfg: dict[str, Any], model_name: str, weights: str | None
) -> dict[str, Any]:
    """open_clip's eval preprocessing: defaults < model config < pretrained-tag config."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), full_cfg.get("preprocess_cfg", {}) or {})
    if weights and not weights.startswith(HF_PREFIX) and not model_name.startswith(HF_PREFIX):
        import open_clip

        tag_cfg = open_clip.get_pretrained_cfg(model_name, weights)
        if tag_cfg:
            cfg = merge_preprocess_dict(cfg, tag_cfg)
    return cfg


def _image_size(vision_cfg: dict[str, Any]) -> int:
    size = vision_cfg.get("image_size", 224)
    if isinstance(size, list | tuple):
        if size[0] != size[1]:
            raise ConfigError(f"non-square open_clip image size {size} is not supported")
        size = size[0]
    return int(size)


def _download_weights(model_name: str, weights: str, gated: bool) -> tuple[str, dict[str, Any]]:
    """Local file of `weights` (an open_clip tag or hf-hub:org/repo) and its identity."""
    import open_clip

    if weights.startswith(HF_PREFIX):
        repo = weights[len(HF_PREFIX) :]
        hub_file = hub.fetch(repo, CLIP_WEIGHT_FILES, gated=gated, what=f"the weights of {repo}")
        return hub_file.path, hub_file.identity()
    cfg = open_clip.get_pretrained_cfg(model_name, weights)
    if not cfg:
        raise ConfigError(
            f"open_clip has no pretrained tag {weights!r} for {model_name!r}; known: "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'}"
        )
    if cfg.get("hf_hub"):
        repo, _, filename = _split_hub(cfg["hf_hub"])
        files = tuple(dict.fromkeys(((filename,) if filename else ()) + CLIP_WEIGHT_FILES))
        hub_file = hub.fetch(
            repo, files, gated=gated, what=f"open_clip weights {model_name} {weights}"
        )
        return hub_file.path, {"open_clip_tag": weights, **hub_file.identity()}
    try:  # URL-only weights (a few OpenAI / older tags)
        path = open_clip.pretrained.download_pretrained(cfg)
        return path, file_identity(path, source="url", url=cfg.get("url"), open_clip_tag=weights)
    except DOWNLOAD_ERRORS as exc:
        raise CbmirError(
            f"could not download open_clip weights {model_name} {weights} from {cfg.get('url')}: "
            f"{type(exc).__name__}. " + hub.OFFLINE_HELP
        ) from exc


def _split_hub(hf_hub: str) -> tuple[str, str, str]:
    """open_clip's 'org/repo/' or 'org/repo/file.bin' -> (repo, '', filename)."""
    parts = hf_hub.strip("/").split("/")
    repo = "/".join(parts[:2])
    filename = "/".join(parts[2:]) if hf_hub.count("/") >= 2 and not hf_hub.endswith("/") else ""
    return repo, "", filename


def _load_visual(tower: ImageTower, path: str, label: str, trust: bool = False) -> None:
    from open_clip.model import resize_pos_embed

    def convert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not any(k.startswith("visual.") for k in sd):
            sd = {f"visual.{k}": v for k, v in sd.items()}  # an image-tower-only state dict
        resize_pos_embed(sd, tower)
        return sd

    load_into(
        tower,
        path,
        label=label,
        convert=convert,
        # a full CLIP checkpoint: its text tower and logit scale are not needed here
        ignore_unexpected=(r"^(?!visual\.)",),
        trust=trust,
    )
