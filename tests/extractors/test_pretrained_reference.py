"""Each weights source the configs use, loaded as a user loads it (default `pretrained=true`,
`HF_HUB_OFFLINE=1`, a local hub cache with deterministic random weights in the real
repositories' file names and formats), against the upstream library's own loading path and its
own transform on PIL images: relative difference <= 1e-4 and the same top-5 neighbours.

Small architectures of the same families stand in for the big ones (the code path is the same:
config, hub file, loader); the real architectures run under `pytest -m slow`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from tests.helpers import compose_config
from tests.hub_cache import add_file, torch_bytes

from cbmir.embedding import FrozenEmbedder

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
TINY_VIT = {"embed_dim": 192, "depth": 2, "num_heads": 3}
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1},
}


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 RGB images [n, 3, size, size] with structure (upsampled 6x6 noise), so that
    neighbours are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return (fine * 255).round().to(torch.uint8)


def pil(batch: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in batch]


def build(overrides: list[str]):
    """The extractor of a composed model config, as the pipeline builds it."""
    cfg = OmegaConf.to_container(compose_config(overrides).model, resolve=True)
    cfg.pop("volume", None)
    return instantiate(cfg)


def ours(extractor, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return FrozenEmbedder(extractor).embed_images(batch).float()


def top5(emb: torch.Tensor) -> np.ndarray:
    dist = torch.cdist(emb.double(), emb.double())
    dist.fill_diagonal_(float("inf"))
    return dist.argsort(dim=1)[:, :5].numpy()


def assert_matches(got: torch.Tensor, reference: torch.Tensor) -> None:
    assert got.shape == reference.shape
    rel = ((got - reference).norm() / reference.norm()).item()
    assert rel <= 1e-4, f"relative difference {rel:.2e}"
    np.testing.assert_array_equal(top5(got), top5(reference))


# -- timm: a hub repository holding timm weights (UNI: MahmoodLab/UNI pytorch_model.bin) ------
def test_uni_style_hub_repo_matches_timm_hf_hub_loading(hub_cache, tmp_path) -> None:
    repo = "SomeLab/tiny-uni"
    args = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}
    torch.manual_seed(0)
    net = timm.create_model("vit_large_patch16_224", num_classes=0, **args, **TINY_VIT)
    add_file(hub_cache, repo, "pytorch_model.bin", torch_bytes(net.state_dict(), tmp_path / "w"))
    config = {  # UNI's config.json, with the tiny width and depth
        "architecture": "vit_large_patch16_224",
        "num_classes": 0,
        "global_pool": "token",
        "model_args": {**args, **TINY_VIT, "num_classes": 0},
        "pretrained_cfg": {
            "tag": "uni_mass100k",
            "input_size": [3, 224, 224],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "mean": IMAGENET[0],
            "std": IMAGENET[1],
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    add_file(hub_cache, repo, "config.json", json.dumps(config).encode())
    extractor = build(
        ["model=uni", f"model.hf_hub_id={repo}"]
        + [f"+model.model_kwargs.{k}={v}" for k, v in TINY_VIT.items()]
    )
    batch = images(12, 224)
    # UNI's model card: timm.create_model("hf-hub:MahmoodLab/UNI", pretrained=True, ...)
    from torchvision import transforms

    ref_model = timm.create_model(
        f"hf-hub:{repo}", pretrained=True, init_values=1e-5, dynamic_img_size=True
    ).eval()
    transform = transforms.Compose(
        [transforms.Resize(224), transforms.ToTensor(), transforms.Normalize(*IMAGENET)]
    )
    with torch.no_grad():
        reference = ref_model(torch.stack([transform(im) for im in pil(batch)]))
    assert_matches(ours(extractor, batch), reference)
    assert extractor.identity()["weights"]["repo"] == repo


# -- open_clip: an hf-hub: model (BiomedCLIP: open_clip_config.json + full CLIP state dict) ----
def _tiny_clip_state(seed: int) -> dict[str, torch.Tensor]:
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(**TINY_CLIP).state_dict()  # both towers, as published


def test_hf_hub_open_clip_model_matches_open_clip_create_model_from_pretrained(
    hub_cache, tmp_path
) -> None:
    import open_clip

    repo = "SomeLab/tiny-biomedclip"
    state = _tiny_clip_state(1)
    add_file(hub_cache, repo, "open_clip_pytorch_model.bin", torch_bytes(state, tmp_path / "w"))
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    add_file(hub_cache, repo, "open_clip_config.json", json.dumps(config).encode())
    extractor = build(
        ["model=biomedclip", f"model.model_name=hf-hub:{repo}", "model.name=tiny-biomedclip"]
    )
    batch = images(12, 32)
    model, preprocess = open_clip.create_model_from_pretrained(f"hf-hub:{repo}")
    with torch.no_grad():
        x = torch.stack([preprocess(im) for im in pil(batch)])
        reference = model.eval().encode_image(x, normalize=True)  # biomedclip: normalize=true
    assert_matches(ours(extractor, batch), reference)
    assert extractor.identity()["weights"]["file"] == "open_clip_pytorch_model.bin"


# -- open_clip: a pretrained tag (ViT-g-14 laion2b_s34b_b88k; a tiny registered stand-in) -------
@pytest.fixture
def tiny_tagged_clip(monkeypatch) -> tuple[str, str, str]:
    """A tiny architecture registered in open_clip with a pretrained tag on the hub, as
    ViT-g-14's `laion2b_s34b_b88k` (`hf_hub='laion/CLIP-ViT-g-14-laion2B-s34B-b88K/'`)."""
    from open_clip import factory, pretrained

    name, tag, repo = "tiny-clip", "tiny_laion", "SomeLab/CLIP-tiny-laion"
    monkeypatch.setitem(factory._MODEL_CONFIGS, name, TINY_CLIP)
    cfg = pretrained._pcfg(hf_hub=f"{repo}/", mean=(0.5,) * 3, std=(0.25,) * 3)
    monkeypatch.setitem(pretrained._PRETRAINED, name, {tag: cfg})
    return name, tag, repo


def test_open_clip_pretrained_tag_matches_create_model_and_transforms(
    hub_cache, tiny_tagged_clip, tmp_path
) -> None:
    import open_clip

    name, tag, repo = tiny_tagged_clip
    state = _tiny_clip_state(2)
    add_file(hub_cache, repo, "open_clip_pytorch_model.bin", torch_bytes(state, tmp_path / "w"))
    extractor = build(["model=openclip_vitg14", f"model.model_name={name}", f"model.weights={tag}"])
    batch = images(12, 32)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag)
    with torch.no_grad():
        x = torch.stack([preprocess(im) for im in pil(batch)])
        reference = model.eval().encode_image(x)  # the paper: not normalised
    assert_matches(ours(extractor, batch), reference)
    assert extractor.identity()["weights"]["open_clip_tag"] == tag
