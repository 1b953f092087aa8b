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


# -- CONCH: MahmoodLab/conch pytorch_model.bin (gated), a tiny CoCa standing in ---------------
TINY_CONCH = {  # cbmir's `architecture` of the tiny CoCa below (CONCH: 768 wide, 12 deep, 448 px)
    "width": 64,
    "depth": 2,
    "heads": 2,
    "embed_dim": 32,
    "pooler_heads": 8,
    "image_size": 32,
    "patch_size": 8,
}
TINY_COCA = {  # conch-fork's conch_ViT-B-16.json, scaled down
    "embed_dim": 32,
    "embed_dim_caption": 32,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 8,
        "width": 64,
        "layers": 2,
        "num_heads": 2,
        "attentional_pool_caption": True,
        "attentional_pool_contrast": True,
        "n_queries_contrast": 1,
        "n_queries_caption": 4,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 8,
        "vocab_size": 50,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1},
}


def conch_overrides() -> list[str]:
    arch = ",".join(f"{k}:{v}" for k, v in TINY_CONCH.items())
    return ["model=conch", f"+model.architecture={{{arch}}}", "model.input_size=32"]


def test_conch_weights_from_the_hub_cache(hub_cache, tmp_path) -> None:
    from cbmir.extractors.conch import ConchVisual
    from cbmir.extractors.open_clip_extractor import ImageTower

    torch.manual_seed(3)
    tower = ImageTower(ConchVisual(**TINY_CONCH))
    state = {**tower.state_dict(), "text.token_embedding.weight": torch.zeros(50, 32)}
    state["visual.attn_pool_caption.query"] = torch.zeros(4, 32)
    link = add_file(
        hub_cache, "MahmoodLab/conch", "pytorch_model.bin", torch_bytes(state, tmp_path / "w")
    )
    extractor = build(conch_overrides())
    batch = images(12, 32)
    with torch.no_grad():
        x = extractor.preprocess(batch)
        reference = tower.visual.eval().forward_no_head(x, normalize=True)
    assert_matches(ours(extractor, batch), reference)
    assert extractor.identity()["weights"]["sha256"] == link.resolve().name


def test_conch_matches_conch_fork_loading(hub_cache, tmp_path) -> None:
    """CONCH's own code (`pip install conch-fork`): create_model + its eval transform on PIL."""
    pytest.importorskip("conch.open_clip_custom", reason="conch-fork is not installed")
    from conch.open_clip_custom import CoCa, create_model
    from conch.open_clip_custom.transform import image_transform

    torch.manual_seed(4)
    coca_state = CoCa(**TINY_COCA).state_dict()
    link = add_file(
        hub_cache, "MahmoodLab/conch", "pytorch_model.bin", torch_bytes(coca_state, tmp_path / "w")
    )
    extractor = build(conch_overrides())
    batch = images(12, 32)
    model = create_model(json.loads(json.dumps(TINY_COCA)), checkpoint_path=str(link)).eval()
    transform = image_transform(32, mean=(0.48145466, 0.4578275, 0.40821073),
                                std=(0.26862954, 0.26130258, 0.27577711))  # fmt: skip
    with torch.no_grad():
        x = torch.stack([transform(im) for im in pil(batch)])
        reference = model.encode_image(x, proj_contrast=False, normalize=True)
    assert_matches(ours(extractor, batch), reference)


# -- MedCLIP: medclip-vit-pretrained.zip's pytorch_model.bin (transformers' Swin names) --------
def test_medclip_cached_download_is_loaded_and_keyed_by_its_file(hub_cache, tmp_path) -> None:
    from tests.swin_names import hf_swin_names

    from cbmir.extractors.checkpoint import UnreadableWeightsError

    torch.manual_seed(5)
    from cbmir.extractors.medclip import MedClipExtractor

    source = MedClipExtractor(pretrained=False).freeze()
    state = {
        f"vision_model.model.{k}": v
        for k, v in hf_swin_names(source.vision_model.model.state_dict()).items()
    }
    state["vision_model.projection_head.weight"] = source.vision_model.projection_head.weight
    state["text_model.projection_head.weight"] = torch.zeros(512, 768)
    target = tmp_path / "cbmir-cache" / "medclip-vit" / "pytorch_model.bin"  # CBMIR_CACHE
    target.parent.mkdir(parents=True)
    target.write_bytes(torch_bytes(state, tmp_path / "w"))
    extractor = build(["model=medclip"])
    batch = images(6, 224)
    assert_matches(ours(extractor, batch), ours(source, batch))
    weights = extractor.identity()["weights"]
    assert weights["source"] == "medclip-vit-pretrained"
    assert weights["size"] == target.stat().st_size and len(weights["sha256"]) == 64
    target.write_bytes(target.read_bytes()[:2000])  # a truncated download
    with pytest.raises(UnreadableWeightsError, match=f"rm {target}"):
        MedClipExtractor()


def test_medclip_matches_transformers_swin(hub_cache, tmp_path) -> None:
    """MedCLIP's own network: transformers' SwinModel + projection, L2-normalised."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from cbmir.extractors.medclip import swin_config

    torch.manual_seed(6)
    swin = transformers.SwinModel(transformers.SwinConfig(**swin_config())).eval()
    projection = torch.nn.Linear(768, 512, bias=False)
    state = {f"vision_model.model.{k}": v for k, v in swin.state_dict().items()}
    state["vision_model.projection_head.weight"] = projection.weight.detach()
    target = tmp_path / "cbmir-cache" / "medclip-vit" / "pytorch_model.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(torch_bytes(state, tmp_path / "w"))
    extractor = build(["model=medclip"])
    batch = images(6, 224)
    with torch.no_grad():
        x = extractor.preprocess(batch)
        pooled = swin(pixel_values=x).pooler_output
        reference = torch.nn.functional.normalize(projection(pooled), dim=-1)
    assert_matches(ours(extractor, batch), reference)


# -- timm: weights published at a URL only (torch hub's cache) -------------------------------
def test_timm_url_only_tag_matches_timm_loading_and_keys_by_the_file(hub_cache, tmp_path) -> None:
    from cbmir.extractors.checkpoint import UnreadableWeightsError
    from cbmir.extractors.timm_extractor import TimmExtractor

    tag = "gcvit_xxtiny.in1k"
    url = timm.models.get_pretrained_cfg(tag).url
    assert url and not timm.models.get_pretrained_cfg(tag).hf_hub_id
    torch.manual_seed(7)
    state = timm.create_model("gcvit_xxtiny", pretrained=False).state_dict()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]  # TORCH_HOME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(torch_bytes(state, tmp_path / "w"))
    extractor = TimmExtractor(model_name=tag, pool="avg")
    batch = images(8, 224)  # gcvit's windows need 224 px
    reference_model = timm.create_model(tag, pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        reference = reference_model.forward_features(extractor.preprocess(batch)).mean((2, 3))
    assert_matches(ours(extractor, batch), reference)
    weights = extractor.identity()["weights"]
    assert (weights["source"], weights["url"], weights["file"]) == ("url", url, cached.name)
    assert weights["size"] == cached.stat().st_size
    cached.write_bytes(cached.read_bytes()[:3000])
    with pytest.raises(UnreadableWeightsError, match=f"rm {cached}"):
        TimmExtractor(model_name=tag, pool="avg")
