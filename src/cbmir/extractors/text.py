"""Text towers of the vision-language extractors, for text-to-image retrieval.

A text tower turns sentences into vectors in the same space as its model's image embeddings
(CLIP's shared space). It is built from the same `model` config as the image extractor (same
weights file, same seed for random weights), so a prompt and the stored images meet in one space.

- open_clip models (OpenCLIP ViT-g-14, BiomedCLIP, any `model=open_clip`): open_clip's own text
  tower and tokenizer (`SimpleTokenizer` bundled with open_clip, or the Hugging Face tokenizer
  named by the config's `hf_tokenizer_name`, e.g. BiomedCLIP's PubMedBERT).
- CONCH: CONCH's own text encoder and tokenizer (`conch-fork`), as `CoCa.encode_text`.

Image side: open_clip stores `encode_image` (already projected into the shared space). CONCH's
image-retrieval protocol stores `proj_contrast=False` features (not in the shared space), so the
text protocol embeds CONCH's projected features (`model.proj_contrast=true`) as their own store
entry (`shared_space_config`). A model without an entry in `TEXT_TOWERS` has no text tower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from cbmir.errors import CbmirError, ConfigError

from .checkpoint import load_into, weights_identity
from .random_init import build_random, random_identity

OPEN_CLIP_TARGET = "cbmir.extractors.open_clip_extractor.OpenClipExtractor"
CONCH_TARGET = "cbmir.extractors.conch.ConchExtractor"


@runtime_checkable
class TextEncoder(Protocol):
    """Sentences -> L2-normalised vectors in the model's shared image-text space."""

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), D] float, each row of unit length."""
        ...

    def text_identity(self) -> dict[str, Any]:
        """Everything that changes a text embedding (weights, architecture, tokenizer)."""
        ...


# -- open_clip --------------------------------------------------------------------------------
class OpenClipText(nn.Module):
    """open_clip's text tower: `CLIP.encode_text` / `CustomTextCLIP.encode_text`, normalised."""

    def __init__(
        self,
        model_name: str,
        weights: str | None = None,
        pretrained: bool = True,
        checkpoint: str | None = None,
        model_config: str | None = None,
        gated: bool = False,
        trust_checkpoint: bool = False,
        seed: int = 0,
        **_image_only: Any,
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.model import _build_text_tower

        from . import open_clip_extractor as oce

        if weights is None and model_name.startswith(oce.HF_PREFIX):
            weights = model_name  # an hf-hub: model's weights are its own repository's
        full_cfg = oce._model_config(model_name, model_config, gated)
        cfg = full_cfg.get("model_cfg", full_cfg)
        text_cfg = dict(cfg.get("text_cfg") or {})
        if not text_cfg:
            raise ConfigError(f"open_clip config of {model_name!r} has no text_cfg: no text tower")
        if text_cfg.get("hf_model_name"):  # weights from the CLIP file, never the bare BERT's
            text_cfg["hf_model_pretrained"] = False
        # CLIP keeps its text tower at the top level, CustomTextCLIP (HF text) under `text.`
        self._custom = bool(cfg.get("custom_text")) or bool(text_cfg.get("hf_model_name"))
        embed_dim, quick_gelu = int(cfg["embed_dim"]), bool(cfg.get("quick_gelu", False))

        def build() -> nn.Module:
            return _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)

        if checkpoint or pretrained:
            tower = build()
            if checkpoint:
                path, self.weights = str(checkpoint), weights_identity(str(checkpoint))
            else:
                if not weights:
                    raise ConfigError(f"open_clip model {model_name!r}: set model.weights")
                path, self.weights = oce._download_weights(model_name, weights, gated)
            self._load(tower, path, trust_checkpoint, model_name)
        else:
            tower = build_random(build, seed)
            self.weights = {"random": random_identity(seed, "open_clip")}
        self.text = tower
        self.tokenizer = _open_clip_tokenizer(text_cfg)
        self._ident = {
            "text_tower": "open_clip",
            "model_name": model_name,
            "text_cfg": text_cfg,
            "embed_dim": embed_dim,
            "weights": self.weights,
            "open_clip": open_clip.__version__,
        }
        self.eval().requires_grad_(False)

    def _load(self, tower: nn.Module, path: str, trust: bool, model_name: str) -> None:
        holder = nn.ModuleDict({"text": tower})

        def convert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if self._custom:
                return sd
            own = {k.split(".", 1)[0] for k in tower.state_dict()}
            return {f"text.{k}" if k.split(".", 1)[0] in own else k: v for k, v in sd.items()}

        load_into(
            holder,
            path,
            label=f"the text tower of open_clip {model_name!r}",
            convert=convert,
            ignore_unexpected=(r"^(?!text\.)",),  # image tower, logit scale
            trust=trust,
        )

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.text.parameters()).device
        out = self.text(self.tokenizer(list(texts)).to(device))
        out = out[0] if isinstance(out, tuple) else out  # towers configured with output_tokens
        return F.normalize(out.float(), dim=-1)

    def text_identity(self) -> dict[str, Any]:
        return dict(self._ident)


def _open_clip_tokenizer(text_cfg: Mapping[str, Any]) -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer open_clip's `get_tokenizer` picks for this text config."""
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

    context = int(text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH))
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    name = text_cfg.get("hf_tokenizer_name")
    if not name:
        return SimpleTokenizer(context_length=context, **kwargs)
    try:
        return HFTokenizer(
            name, context_length=context, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs
        )
    except OSError as exc:
        from . import hub

        raise CbmirError(
            f"the tokenizer {name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded ({type(exc).__name__}). {hub.OFFLINE_HELP}"
        ) from None


# -- CONCH ------------------------------------------------------------------------------------
class ConchText(nn.Module):
    """CONCH's text encoder: `CoCa.encode_text(tokenize(texts))`, normalised."""

    def __init__(
        self,
        pretrained: bool = True,
        checkpoint: str | None = None,
        hf_hub_id: str = "MahmoodLab/conch",
        trust_checkpoint: bool = False,
        seed: int = 0,
        architecture: Mapping[str, Any] | None = None,
        text_cfg: Mapping[str, Any] | None = None,
        **_image_only: Any,
    ) -> None:
        super().__init__()
        from conch.open_clip_custom.coca_model import _build_text_tower
        from conch.open_clip_custom.custom_tokenizer import get_tokenizer

        from . import hub
        from .conch import conch_config

        cfg = conch_config()  # CbmirError when CONCH's code is not installed
        text_cfg = {**cfg["text_cfg"], **dict(text_cfg or {})}
        # the shared space's width: the image tower's (`architecture`, scaled down in tests)
        embed_dim = int(dict(architecture or {}).get("embed_dim", cfg["embed_dim"]))

        def build() -> nn.Module:
            return nn.ModuleDict({"text": _build_text_tower(embed_dim, text_cfg)})

        if checkpoint or pretrained:
            holder = build()
            if checkpoint:
                path, self.weights = str(checkpoint), weights_identity(str(checkpoint))
            else:
                found = hub.fetch(hf_hub_id, ("pytorch_model.bin",), gated=True, what="CONCH")
                path, self.weights = found.path, found.identity()
            load_into(
                holder,
                path,
                label="CONCH's text encoder",
                ignore_unexpected=(r"^(?!text\.)",),
                trust=trust_checkpoint,
            )
        else:
            holder = build_random(build, seed)
            self.weights = {"random": random_identity(seed, "conch")}
        self.text = holder.text
        self.tokenizer = get_tokenizer()
        self._ident = {
            "text_tower": "conch",
            "text_cfg": text_cfg,
            "embed_dim": embed_dim,
            "weights": self.weights,
        }
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.text.parameters()).device
        tokens = conch_tokenize(self.tokenizer, list(texts)).to(device)
        pooled = self.text(tokens[:, :-1])  # the last slot is CONCH's <cls> placeholder
        pooled = pooled[0] if isinstance(pooled, tuple) else pooled
        return F.normalize(pooled.float(), dim=-1)

    def text_identity(self) -> dict[str, Any]:
        return dict(self._ident)


def conch_tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """conch-fork's `tokenize` (127 tokens, padded, one <pad> slot for <cls> appended), with
    the tokenizer's `__call__`: its `batch_encode_plus` is gone from transformers 5."""
    tokens = tokenizer(
        texts,
        max_length=127,
        add_special_tokens=True,
        return_token_type_ids=False,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return F.pad(tokens["input_ids"], (0, 1), value=tokenizer.pad_token_id)


# -- MedCLIP ----------------------------------------------------------------------------------
MEDCLIP_BERT = "emilyalsentzer/Bio_ClinicalBERT"
MEDCLIP_TARGET = "cbmir.extractors.medclip.MedClipExtractor"


class MedClipTextTower(nn.Module):
    """MedCLIP's `MedCLIPTextModel`: BERT, the mean over tokens of hidden states 1, 2 and the
    last, averaged, then `projection_head` (Linear, no bias); names as in MedCLIP's checkpoint."""

    def __init__(self, config: Any, proj_dim: int = 512) -> None:
        super().__init__()
        from transformers import BertModel

        self.model = BertModel(config)
        self.projection_head = nn.Linear(config.hidden_size, proj_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        hidden = out.hidden_states
        layers = torch.stack([hidden[1], hidden[2], hidden[-1]])  # [3, B, T, W]
        return self.projection_head(layers.permute(1, 0, 2, 3).mean(2).mean(1))


class MedClipText(nn.Module):
    """MedCLIP's text path: `MedCLIPModel.encode_text` (normalised), Bio_ClinicalBERT tokens.

    Upstream pools over every position, padding included, so a prompt's vector would depend
    on the other prompts of its batch; each prompt is tokenised and embedded alone (no padding).
    """

    def __init__(
        self,
        pretrained: bool = True,
        checkpoint: str | None = None,
        cache_dir: str | None = None,
        trust_checkpoint: bool = False,
        seed: int = 0,
        bert_type: str = MEDCLIP_BERT,
        **_image_only: Any,
    ) -> None:
        super().__init__()
        from .medclip import download_weights

        config, self.tokenizer = _bert_files(bert_type)

        def build() -> nn.Module:
            return nn.ModuleDict({"text_model": MedClipTextTower(config)})

        if checkpoint or pretrained:
            holder = build()
            path = str(checkpoint) if checkpoint else str(download_weights(cache_dir))
            self.weights = weights_identity(path)
            load_into(
                holder,
                path,
                label="MedCLIP's text model (BERT + projection)",
                ignore_unexpected=(r"^(?!text_model\.)", r"position_ids$"),
                trust=trust_checkpoint,
            )
        else:
            holder = build_random(build, seed)
            self.weights = {"random": random_identity(seed, "transformers")}
        self.text_model = holder.text_model
        self._ident = {"text_tower": "medclip", "bert": bert_type, "weights": self.weights}
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.text_model.parameters()).device
        rows = []
        for text in texts:
            tokens = self.tokenizer(text, truncation=True, max_length=77, return_tensors="pt")
            rows.append(
                self.text_model(
                    tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
                )[0]
            )
        return F.normalize(torch.stack(rows).float(), dim=-1)

    def text_identity(self) -> dict[str, Any]:
        return dict(self._ident)


def _bert_files(bert_type: str) -> tuple[Any, Any]:
    """BERT's config and tokenizer (a hub repository, cached, or a local folder)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        return AutoConfig.from_pretrained(bert_type), AutoTokenizer.from_pretrained(bert_type)
    except OSError as exc:
        from . import hub

        raise CbmirError(
            f"MedCLIP's text tower needs {bert_type}'s config and tokenizer, which are not "
            f"cached and could not be downloaded ({type(exc).__name__}). {hub.OFFLINE_HELP}"
        ) from None


# -- registry ---------------------------------------------------------------------------------
#: image extractor class (a model config's `_target_`) -> its text tower
TEXT_TOWERS: dict[str, Callable[..., TextEncoder]] = {
    OPEN_CLIP_TARGET: OpenClipText,
    CONCH_TARGET: ConchText,
    MEDCLIP_TARGET: MedClipText,
}
#: model settings the text protocol needs so the stored image features are in the shared space
SHARED_SPACE: dict[str, dict[str, Any]] = {
    CONCH_TARGET: {"proj_contrast": True},
}


def has_text_tower(model_cfg: Mapping[str, Any]) -> bool:
    return model_cfg.get("_target_") in TEXT_TOWERS


def models_with_text_tower() -> list[str]:
    """The `model=` config choices whose extractor has a text tower (read from configs/model)."""
    import yaml

    from cbmir.config import config_dir

    names = []
    for path in sorted((config_dir() / "model").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text("utf-8")) or {}).get("_target_")
        if target in TEXT_TOWERS:
            names.append(path.stem)
    return names


#: packages a text tower needs beyond cbmir's own dependencies
TEXT_PACKAGES: dict[str, tuple[str, str]] = {
    CONCH_TARGET: ("conch", "CONCH's text tower needs CONCH's code (pip install conch-fork)"),
    MEDCLIP_TARGET: ("transformers", "MedCLIP's text tower needs pip install transformers"),
}


def check_text_tower(model_cfg: Mapping[str, Any], model_name: str) -> None:
    """A ConfigError naming the models that have a text tower (or the missing package),
    before any data is read or weights load."""
    import importlib.util

    if not has_text_tower(model_cfg):
        raise ConfigError(
            f"retrieval.query=text needs a model with a text tower; {model_name!r} has none. "
            f"Choose one of: {', '.join(models_with_text_tower())}"
        )
    package, hint = TEXT_PACKAGES.get(str(model_cfg.get("_target_")), ("", ""))
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"{hint}; it is not installed")


def shared_space_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The image extractor's config with the settings that put its features in the shared
    space (CONCH: `proj_contrast=true`, a different store key from image retrieval's)."""
    return {**dict(model_cfg), **SHARED_SPACE.get(str(model_cfg.get("_target_")), {})}


def build_text_encoder(model_cfg: Mapping[str, Any]) -> TextEncoder:
    """The text tower of the image extractor `model_cfg` describes (same weights and seed)."""
    target = str(model_cfg.get("_target_"))
    if target not in TEXT_TOWERS:
        raise ConfigError(f"{target} has no text tower")
    kwargs = {k: v for k, v in model_cfg.items() if not str(k).startswith("_")}
    return TEXT_TOWERS[target](**kwargs)
