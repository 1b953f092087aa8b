"""MedCLIP-ViT (Wang et al. 2022) image features, without the unmaintained `medclip` package.

Upstream `MedCLIPVisionModelViT` is a Hugging Face `SwinModel`
(`microsoft/swin-tiny-patch4-window7-224`) whose `pooler_output` (mean of the final
layer-normed tokens, 768-d) goes through `projection_head = Linear(768, 512, bias=False)`;
`MedCLIPModel.encode_image` L2-normalises the result (512-d). The `medclip` package pins an old
`transformers`, downloads weights at import time and calls `.cuda()` unconditionally; here the
same network is built with timm's Swin-T (the Hugging Face config ships with this package, no
`transformers` needed) and MedCLIP's published `pytorch_model.bin` is loaded by renaming its
Hugging Face Swin keys to timm's (query/key/value fused into qkv, patch merging moved to the
start of the next stage). Checked to give the same embeddings as transformers' `SwinModel` +
projection from the same weights.

Preprocessing is `MedCLIPProcessor`'s: convert to grayscale (PIL 'L'), paste centred on a black
square canvas of side max(224, H, W) (images smaller than 224 are padded, *not* upsampled),
resize to 224 (bicubic), normalise with MedCLIP's mean/std (0.586, 0.280), repeat to 3 channels.
`model.resize_mode=shortest` upsamples small images instead.

Weights: `model.checkpoint=/path/to/pytorch_model.bin` (from MedCLIP's released
`medclip-vit-pretrained.zip`), or the default download: the zip's address is read from
MedCLIP's repository (`medclip_vit_weight.txt`) as the upstream package does, and cached.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbmir.errors import CbmirError

from .base import Extractor
from .checkpoint import StateDict, hint_on_error, load_into, weights_identity
from .hub import cache_hint, offline
from .preprocessing import ModelTransform
from .random_init import build_random, random_identity
from .weights_file import cache_root, file_identity

IMG_MEAN = (0.5862785803043838,)
IMG_STD = (0.27950088968644304,)
WEIGHTS_POINTER = "https://github.com/RyanWangZf/MedCLIP/raw/main/medclip/medclip_vit_weight.txt"
PROJECT_PAGE = "https://github.com/RyanWangZf/MedCLIP"


def swin_config() -> dict[str, Any]:
    text = (
        resources.files("cbmir.extractors")
        .joinpath("assets", "medclip_swin_tiny_config.json")
        .read_text("utf-8")
    )
    return json.loads(text)


def build_swin(cfg: dict[str, Any] | None = None) -> nn.Module:
    """timm Swin equal to transformers' `SwinModel(SwinConfig(**cfg))` (no classifier)."""
    import timm

    cfg = cfg or swin_config()
    if cfg.get("use_absolute_embeddings"):
        raise CbmirError("Swin with absolute position embeddings is not supported")
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=0,
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        window_size=cfg["window_size"],
        embed_dim=cfg["embed_dim"],
        depths=tuple(cfg["depths"]),
        num_heads=tuple(cfg["num_heads"]),
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=cfg["qkv_bias"],
    )


class MedClipVision(nn.Module):
    """Swin-T -> mean-pooled tokens -> Linear(768, 512, bias=False); names as upstream."""

    def __init__(self, projection_dim: int = 512) -> None:
        super().__init__()
        self.model = build_swin()
        self.projection_head = nn.Linear(self.model.num_features, projection_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.projection_head(pooled)


#: Hugging Face Swin block names -> timm (transformers 4.x names, as in MedCLIP's file, and 5.x)
_HF_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.q_proj": "query",
    "attention.k_proj": "key",
    "attention.v_proj": "value",
}


def hf_swin_to_timm(sd: StateDict) -> StateDict:
    """Rename a MedCLIP / Hugging Face Swin state dict to `vision_model.` + `MedClipVision` keys."""
    anchor = "embeddings.patch_embeddings.projection.weight"
    prefixes = [k[: -len(anchor)] for k in sd if k.endswith(anchor)]
    if not prefixes:
        return sd  # not Hugging Face Swin: leave it to the key check
    src = prefixes[0]
    dst = "vision_model.model."
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    # MedCLIP: vision_model.model.<swin> and vision_model.projection_head (not text_model's)
    vision_root = src[: -len("model.")] if src.endswith("model.") else src
    for key, value in sd.items():
        if key == vision_root + "projection_head.weight":
            out["vision_model.projection_head.weight"] = value
            continue
        if not key.startswith(src):
            out[key] = value  # text tower etc.: reported or ignored by the loader
            continue
        k = key[len(src) :]
        if k.endswith(("relative_position_index", "attn_mask")):
            continue  # buffers timm recomputes
        if k.startswith("embeddings.patch_embeddings.projection."):
            out[dst + "patch_embed.proj." + k.rsplit(".", 1)[1]] = value
        elif k.startswith("embeddings.norm."):
            out[dst + "patch_embed.norm." + k.rsplit(".", 1)[1]] = value
        elif k.startswith("layernorm."):
            out[dst + "norm." + k.rsplit(".", 1)[1]] = value
        elif m := re.match(
            r"encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$", k
        ):
            # HF merges patches at the end of stage i, timm at the start of stage i + 1
            out[f"{dst}layers.{int(m[1]) + 1}.downsample.{m[2]}.{m[3]}"] = value
        elif m := re.match(
            r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias|relative_position_bias_table)$",
            k,
        ):
            stage, block, inner, leaf = m[1], m[2], m[3], m[4]
            base = f"{dst}layers.{stage}.blocks.{block}."
            if leaf == "relative_position_bias_table":
                out[base + "attn.relative_position_bias_table"] = value
            elif inner in _HF_QKV:
                qkv.setdefault(f"{base}attn.qkv.{leaf}", {})[_HF_QKV[inner]] = value
            elif inner in _HF_BLOCK:
                out[f"{base}{_HF_BLOCK[inner]}.{leaf}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CbmirError(f"incomplete query/key/value tensors for {key} in the Swin checkpoint")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


class MedClipExtractor(ModelTransform, Extractor):
    def __init__(
        self,
        pretrained: bool = True,
        name: str = "medclip",
        checkpoint: str | None = None,
        normalize: bool = True,
        input_size: int = 224,
        interpolation: str = "bicubic",
        resize_mode: str = "pad",
        cache_dir: str | None = None,
        trust_checkpoint: bool = False,
        seed: int = 0,
    ) -> None:
        self.pretrained = bool(pretrained)
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.normalize = bool(normalize)
        hint = "Is it pytorch_model.bin from MedCLIP's medclip-vit-pretrained.zip?"

        def build() -> nn.Module:  # named as in MedCLIP's checkpoint
            return nn.ModuleDict({"vision_model": MedClipVision()})

        if self.checkpoint or self.pretrained:
            tower = build()
        else:  # random weights: from the seed, seeing the whole image (`random_init`)
            tower = build_random(build, seed)
            self.random_init = random_identity(seed, "timm")
        if self.checkpoint:
            path, weights = self.checkpoint, weights_identity(self.checkpoint)
        elif self.pretrained:
            path = str(download_weights(cache_dir))
            weights = file_identity(path, source="medclip-vit-pretrained", pointer=WEIGHTS_POINTER)
            hint = cache_hint(path)
        else:
            path, weights = None, "random"
        if path is not None:
            with hint_on_error(hint):
                load_into(
                    tower,
                    path,
                    label="MedCLIP-ViT's vision model (Swin-T + 768->512 projection)",
                    convert=hf_swin_to_timm,
                    ignore_unexpected=(r"^(?!vision_model\.)",),  # text tower, logit scale
                    trust=trust_checkpoint,
                )
        super().__init__(
            input_size=input_size,
            min_size=None,
            mean=IMG_MEAN,
            std=IMG_STD,
            interpolation=interpolation,
        )
        self._set_transform(resize_mode, 1.0, grayscale=True)
        self.name = name
        self.weights = weights
        self.vision_model = tower.vision_model

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(x)
        return F.normalize(out, dim=-1) if self.normalize else out

    def output_dim(self, image_shape: tuple[int, ...] | None = None) -> int:
        return int(self.vision_model.projection_head.out_features)

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident.update(self.transform_identity())
        ident.update(
            architecture="swin-tiny-patch4-window7-224+proj512",
            weights=self.weights,
            normalize=self.normalize,
        )
        return ident


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return cache_root() / "medclip-vit"


def download_weights(cache_dir: str | None = None, timeout: float = 10.0) -> Path:
    """MedCLIP-ViT's `pytorch_model.bin`, downloaded once (as the upstream package does)."""
    root = _cache_root(cache_dir)
    target = root / "pytorch_model.bin"
    if target.is_file():
        return target
    help_text = (
        f"MedCLIP-ViT weights are not cached at {target} and could not be downloaded. Get "
        f"`medclip-vit-pretrained.zip` (see {PROJECT_PAGE}; its address is in "
        f"{WEIGHTS_POINTER}), unzip it and pass model.checkpoint=/path/to/pytorch_model.bin, "
        f"or put the file at {target}. For a test run without weights: model.pretrained=false."
    )
    if offline():
        raise CbmirError("offline (HF_HUB_OFFLINE is set): " + help_text)
    try:
        with urllib.request.urlopen(WEIGHTS_POINTER, timeout=timeout) as resp:
            url = resp.read().decode().strip()
        root.mkdir(parents=True, exist_ok=True)
        archive = root / "medclip-vit-pretrained.zip"
        tmp = archive.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
        tmp.replace(archive)
        with zipfile.ZipFile(archive) as zf:
            member = next(n for n in zf.namelist() if n.endswith("pytorch_model.bin"))
            partial = target.with_suffix(".bin.part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            partial.replace(target)  # never a half-written file at the path later runs trust
        archive.unlink(missing_ok=True)
    except (OSError, StopIteration, zipfile.BadZipFile, ValueError) as exc:
        raise CbmirError(f"{type(exc).__name__}: {str(exc)[:200]}\n" + help_text) from None
    return target
