"""CONCH (Lu et al. 2024, MahmoodLab) image features, as the paper took them:
`model.encode_image(x, proj_contrast=False, normalize=True)` (512-d, L2-normalised).

CONCH's code is not on PyPI under its own name (a third-party copy, `conch-fork`, is; both are
CC BY-NC-ND 4.0) and its weights are gated on the hub (`MahmoodLab/conch`). Two backends:

- `builtin` (default): the same image tower rebuilt from timm and open_clip parts, no extra
  package: a timm ViT-B/16 trunk at 448 px (`forward_features`: all tokens after the final
  norm), open_clip's `AttentionalPooler` (1 query, 8 heads, 768 -> 512) and a LayerNorm; with
  `proj_contrast=False` the contrastive projection is not applied. Parameter names match
  CONCH's checkpoint (`visual.trunk.*`, `visual.attn_pool_contrast.*`, `visual.ln_contrast.*`),
  so the published `pytorch_model.bin` loads strictly; its text tower and captioning pooler
  are skipped. Checked to give identical embeddings to `conch-fork` 0.1.0 from the same
  weights.
- `conch`: CONCH's own code (`pip install conch-fork`, or
  `pip install git+https://github.com/mahmoodlab/CONCH.git`), image tower kept, text dropped.

Preprocessing is CONCH's eval transform: resize the shortest side to 448 (bicubic),
centre-crop 448, OpenAI CLIP mean/std.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbmir.config import check_choice
from cbmir.errors import CbmirError, reason

from . import hub
from .base import Extractor
from .checkpoint import (
    CheckpointError,
    hint_on_error,
    load_into,
    load_torch_file,
    weights_identity,
)
from .open_clip_extractor import ImageTower
from .preprocessing import ModelTransform
from .random_init import build_random, random_identity

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_REPO = "MahmoodLab/conch"
INSTALL_HELP = (
    "CONCH's own code is not installed. Install it (licence CC BY-NC-ND 4.0, non-commercial "
    "use only) with `pip install conch-fork` (a third-party copy on PyPI) or `pip install "
    "git+https://github.com/mahmoodlab/CONCH.git`, or use model.backend=builtin (the same "
    "image tower, no extra package). The weights are gated: accept the terms at "
    f"{hub.model_page(HUB_REPO)} and export HF_TOKEN, or pass model.checkpoint=/path/to/"
    "pytorch_model.bin."
)
BACKENDS = ("builtin", "conch")


class ConchVisual(nn.Module):
    """CONCH's image tower up to the contrastive pooler (no projection)."""

    def __init__(
        self,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        image_size: int = 448,
        embed_dim: int = 512,
        pooler_heads: int = 8,
        n_queries: int = 1,
        project: bool = False,
    ) -> None:
        super().__init__()
        from open_clip.transformer import AttentionalPooler
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp_ratio,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(
            d_model=embed_dim, context_dim=width, n_head=pooler_heads, n_queries=n_queries
        )
        self.ln_contrast = nn.LayerNorm(embed_dim)
        if project:  # into the image-text space (text retrieval only, `proj_contrast=True`)
            self.proj_contrast = nn.Parameter(torch.randn(embed_dim, embed_dim) * embed_dim**-0.5)

    def forward_no_head(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return F.normalize(pooled, dim=-1) if normalize else pooled


class ConchExtractor(ModelTransform, Extractor):
    def __init__(
        self,
        pretrained: bool = True,
        name: str = "conch",
        checkpoint: str | None = None,
        hf_hub_id: str = HUB_REPO,
        backend: str = "builtin",
        normalize: bool = True,
        input_size: int = 448,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        architecture: dict[str, Any] | None = None,
        trust_checkpoint: bool = False,
        seed: int = 0,
        proj_contrast: bool = False,
    ) -> None:
        check_choice(backend, BACKENDS, "CONCH backend")
        self.pretrained = bool(pretrained)
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.backend = backend
        self.normalize = bool(normalize)
        # the paper's features skip the contrastive projection; text retrieval needs it
        self.proj_contrast = bool(proj_contrast)
        arch = {"image_size": 448, **dict(architecture or {})}
        self._arch = arch
        hint = "Is it CONCH's pytorch_model.bin (MahmoodLab/conch)?"
        if self.checkpoint:
            path, weights = self.checkpoint, weights_identity(self.checkpoint)
        elif self.pretrained:
            hub_file = hub.fetch(
                hf_hub_id, ("pytorch_model.bin",), gated=True, what="the CONCH weights"
            )
            path, weights, hint = hub_file.path, hub_file.identity(), hub.cache_hint(hub_file.path)
        else:
            path, weights = None, "random"
            # the two backends build their towers in another order: other draws, same seed
            self.random_init = random_identity(seed, "timm", "open_clip", backend=backend)

        with hint_on_error(hint):
            if backend == "conch":
                visual = (
                    _conch_package_visual(path, trust_checkpoint)
                    if path is not None
                    else build_random(lambda: _conch_package_visual(None), seed)
                )
            else:
                visual = (
                    _builtin_visual(arch, path, trust_checkpoint, self.proj_contrast)
                    if path is not None
                    else build_random(
                        lambda: _builtin_visual(arch, None, False, self.proj_contrast), seed
                    )
                )
        super().__init__(
            input_size=input_size,
            min_size=None,
            mean=OPENAI_MEAN,
            std=OPENAI_STD,
            interpolation=interpolation,
        )
        self._set_transform(resize_mode, 1.0)
        self.name = name
        self.weights = weights
        self.visual = visual
        self._dim = int(arch.get("embed_dim", 512))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.proj_contrast:
            return self.visual.forward_no_head(x, normalize=self.normalize)
        # CoCa.encode_image(x, proj_contrast=True): pooled @ proj_contrast, then normalised
        projected = self.visual.forward_no_head(x) @ self.visual.proj_contrast
        return F.normalize(projected, dim=-1) if self.normalize else projected

    def output_dim(self, image_shape: tuple[int, ...] | None = None) -> int:
        return self._dim

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident.update(self.transform_identity())
        ident.update(
            architecture=self._arch,
            weights=self.weights,
            normalize=self.normalize,
            features=f"encode_image(proj_contrast={self.proj_contrast})",
        )
        # both backends compute the same function: the store key does not depend on it
        return ident


def conch_config() -> dict[str, Any]:
    """CONCH's model config as shipped with `conch-fork` (both of its towers need that code)."""
    try:
        from conch.open_clip_custom import factory
    except ImportError as exc:
        raise CbmirError(INSTALL_HELP) from exc
    return json.loads((factory.CFG_DIR / "conch_ViT-B-16.json").read_text("utf-8"))


def _builtin_visual(
    arch: dict[str, Any], path: str | None, trust: bool, project: bool = False
) -> nn.Module:
    tower = ImageTower(ConchVisual(**arch, project=project))
    unused = r"|proj_contrast" if not project else ""
    if path is not None:
        load_into(
            tower,
            path,
            label="CONCH's image tower (ViT-B/16, 448 px)",
            # the text tower, the captioning pooler and the unused projection
            ignore_unexpected=(
                r"^(?!visual\.)",
                rf"^visual\.(attn_pool_caption|ln_caption|head{unused})\b",
            ),
            trust=trust,
        )
    return tower.visual


def _conch_package_visual(path: str | None, trust: bool = False) -> nn.Module:
    cfg = conch_config()  # CbmirError when CONCH's code is not installed
    cfg.pop("custom_text", None)
    if path is None:
        from conch.open_clip_custom import CoCa

        model = CoCa(**cfg)
    else:
        load_torch_file(path, trust=trust)  # CbmirError for a broken or unsafe file, first
        from conch.open_clip_custom import create_model

        try:
            model = create_model("conch_ViT-B-16", checkpoint_path=path)
        except Exception as exc:
            raise CheckpointError(
                f"CONCH's own code could not load {path} ({reason(exc)})"
            ) from exc
    visual = model.visual
    del model  # drop the text tower and decoder
    return visual
