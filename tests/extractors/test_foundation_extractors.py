"""Foundation-model configs: every one builds offline with random weights (same architecture as
the published weights) and returns its documented dimension; preprocessing follows each
model's own eval transform; gated / offline weights give one clear error, fast."""

from __future__ import annotations

import functools
import time

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tests.helpers import compose_config

from cbmir.errors import CbmirError
from cbmir.extractors import hub
from cbmir.extractors.conch import ConchExtractor
from cbmir.extractors.medclip import MedClipExtractor
from cbmir.extractors.preprocessing import model_resize, pil_luma
from cbmir.extractors.timm_extractor import TimmExtractor


def model_config(overrides: list[str]) -> dict:
    """The composed `model` group as instantiate() takes it: resolved, without the top-level
    `model.volume` settings (3D only, not an extractor argument)."""
    cfg = OmegaConf.to_container(compose_config(overrides).model, resolve=True)
    cfg.pop("volume", None)
    return cfg


# config -> (documented dimension, input size the network sees)
FAST = {
    "biomedclip": (512, 224),
    "conch": (512, 448),
    "medclip": (512, 224),
    "uni": (1024, 224),
    "dinov2_vitl14": (1024, 224),
    "timm": (768, 224),
    "open_clip": (512, 224),
}
# over ~500M parameters: `pytest -m slow`
SLOW = {
    "uni2": (1536, 224),
    "virchow": (2560, 224),
    "virchow2": (2560, 224),
    "openclip_vitg14": (1024, 224),
}


def _build(model: str):
    if model in ("conch", "medclip"):  # small: reused by the preprocessing tests below
        return _build_cached(model)
    return _build_uncached(model)


@functools.cache
def _build_cached(model: str):
    return _build_uncached(model)


def _build_uncached(model: str):
    cfg = model_config([f"model={model}", "model.pretrained=false"])
    assert cfg["name"], "every model config names its runs"
    return instantiate(cfg).freeze()


def _check(model: str, dim: int, size: int) -> None:
    extractor = _build(model)
    assert extractor.output_dim() == dim  # known without running the network
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    x = extractor.preprocess(images)
    assert x.shape == (2, 3, size, size)
    with torch.no_grad():
        out = extractor.embed(x)
    assert out.shape == (2, dim)
    assert torch.isfinite(out).all()
    assert not any(p.requires_grad for p in extractor.parameters())
    assert extractor.identity()["weights"] == "random"


@pytest.mark.parametrize(("model", "spec"), sorted(FAST.items()))
def test_config_builds_offline_with_documented_dimension(model: str, spec: tuple[int, int]) -> None:
    _check(model, *spec)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "spec"), sorted(SLOW.items()))
def test_big_config_builds_offline_with_documented_dimension(
    model: str, spec: tuple[int, int]
) -> None:
    _check(model, *spec)


def test_every_extractor_class_has_a_model_config() -> None:
    """The model configs are the catalogue: each extractor class is some config's target."""
    from omegaconf import OmegaConf

    from cbmir.config import config_dir

    targets = {
        OmegaConf.load(path).get("_target_", "").rsplit(".", 1)[-1]
        for path in (config_dir() / "model").glob("*.yaml")
    }
    expected = {"TimmExtractor", "OpenClipExtractor", "ConchExtractor", "MedClipExtractor"}
    assert expected | {"PixelExtractor"} <= targets


def test_virchow2_skips_register_tokens() -> None:
    """cls+mean averages the patch tokens only: output[:, 1 + 4 registers:]."""
    e = TimmExtractor(
        model_name="vit_tiny_patch16_224",
        pretrained=False,
        pool="cls+mean",
        model_kwargs={"reg_tokens": 4, "global_pool": "", "img_size": 64},
        input_size=64,
        resize_mode="shortest",
    ).freeze()
    assert e.model.num_prefix_tokens == 5
    x = e.preprocess(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        tokens = e.model.forward_features(x)
        out = e.embed(x)
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1))
    assert out.shape[1] == e.output_dim() == 2 * 192


def test_layer_kwargs_given_as_dotted_names_build_swiglu() -> None:
    e = TimmExtractor(
        model_name="vit_tiny_patch16_224",
        pretrained=False,
        pool="cls",
        model_kwargs={
            "mlp_layer": "timm.layers.SwiGLUPacked",
            "act_layer": "torch.nn.SiLU",
            "img_size": 32,
        },
        input_size=32,
    )
    mlp = e.model.blocks[0].mlp
    assert type(mlp).__name__ == "GluMlp" and isinstance(mlp.act, torch.nn.SiLU)  # SwiGLUPacked
    assert e.identity()["model_kwargs"]["mlp_layer"] == "timm.layers.SwiGLUPacked"  # JSON-able


def test_extractors_run_under_autocast() -> None:
    e = TimmExtractor(
        model_name="vit_tiny_patch16_224",
        pretrained=False,
        pool="cls",
        input_size=64,
        model_kwargs={"img_size": 64},
        resize_mode="shortest",
    ).freeze()
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = e(images)
    assert out.shape == (2, 192) and torch.isfinite(out.float()).all()


# -- preprocessing ---------------------------------------------------------------------------
def test_model_resize_matches_pil_resize_and_center_crop() -> None:
    np = pytest.importorskip("numpy")
    from PIL import Image

    torch.manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 40, 60), dtype=torch.uint8)
    pil = Image.fromarray(img[0].permute(1, 2, 0).numpy())
    # torchvision Resize(224, bicubic) + CenterCrop(224), as open_clip / CONCH
    w, h = pil.size
    pil = pil.resize((int(224 * w / h), 224), Image.BICUBIC)
    left = int(round((pil.size[0] - 224) / 2.0))
    pil = pil.crop((left, 0, left + 224, 224))
    expected = torch.from_numpy(np.asarray(pil).astype("float32") / 255).permute(2, 0, 1)
    out = model_resize(img.float() / 255, 224, "shortest", "bicubic")[0]
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 2 / 255  # PIL within a grey level or two


def test_medclip_pads_small_images_in_grayscale_like_its_processor() -> None:
    e = _build("medclip")
    img = torch.full((1, 3, 28, 28), 200, dtype=torch.uint8)
    img[:, 0] = 10
    x = e.preprocess(img)
    assert x.shape == (1, 3, 224, 224)
    luma = pil_luma(img)[0, 0, 0, 0].item()  # PIL 'L' of (10, 200, 200)
    assert luma == round(10 * 0.299 + 200 * 0.587 + 200 * 0.114)
    mean, std = 0.5862785803043838, 0.27950088968644304
    torch.testing.assert_close(x[0, :, 112, 112], torch.full((3,), (luma / 255 - mean) / std))
    torch.testing.assert_close(x[0, :, 0, 0], torch.full((3,), (0 - mean) / std))  # black canvas


def test_conch_preprocessing_is_448_openai_stats() -> None:
    e = _build("conch")
    x = e.preprocess(torch.full((1, 1, 28, 28), 255, dtype=torch.uint8))
    assert x.shape[-1] == 448
    torch.testing.assert_close(
        x[0, :, 0, 0],
        (1 - torch.tensor((0.48145466, 0.4578275, 0.40821073)))
        / torch.tensor((0.26862954, 0.26130258, 0.27577711)),
    )


# -- gated / offline ---------------------------------------------------------------------------
def _cbmir_error(exc: BaseException | None) -> CbmirError | None:
    while exc is not None and not isinstance(exc, CbmirError):
        exc = exc.__cause__ or exc.__context__
    return exc


@pytest.mark.parametrize("model", ["uni", "conch"])
def test_gated_model_offline_is_one_clear_fast_error(model: str, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    cfg = model_config([f"model={model}"])
    start = time.monotonic()
    with pytest.raises(Exception) as info:  # Hydra wraps it; the CLI prints the CbmirError
        instantiate(cfg)
    assert time.monotonic() - start < 10
    error = _cbmir_error(info.value)
    assert isinstance(error, hub.HubError)
    message = str(error)
    assert "https://huggingface.co/MahmoodLab/" in message
    assert "HF_TOKEN" in message and "model.checkpoint" in message
    assert "Traceback" not in message


def test_unreachable_hub_fails_fast_without_retries(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(hub.HubError, match=r"huggingface.co/paige-ai/Virchow2[\s\S]*HF_TOKEN"):
        hub.fetch("paige-ai/Virchow2", ("model.safetensors", "pytorch_model.bin"), gated=True)
    assert time.monotonic() - start < 5


def test_conch_package_backend_missing_is_a_clear_error(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_conch(name, *args, **kwargs):
        if name == "conch" or name.startswith("conch."):
            raise ImportError("No module named 'conch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_conch)
    with pytest.raises(CbmirError, match=r"pip install conch-fork[\s\S]*HF_TOKEN"):
        ConchExtractor(pretrained=False, backend="conch")


def test_medclip_weights_offline_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CbmirError, match="model.checkpoint=/path/to/pytorch_model.bin"):
        MedClipExtractor(pretrained=True, cache_dir=str(tmp_path))
