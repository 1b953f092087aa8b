"""The paper's CNNs: documented dimensions, frozen behaviour, paper-faithful preprocessing."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tests.helpers import compose_config

from cbmir.errors import CbmirError
from cbmir.extractors.pixels import PixelExtractor
from cbmir.extractors.timm_extractor import TimmExtractor


def model_config(overrides: list[str]) -> dict:
    """The composed `model` group as instantiate() takes it: resolved, without the top-level
    `model.volume` settings (3D only, not an extractor argument)."""
    cfg = OmegaConf.to_container(compose_config(overrides).model, resolve=True)
    cfg.pop("volume", None)
    return cfg


PAPER_CNNS = {"vgg19": 512, "resnet50": 2048, "densenet121": 1024, "efficientnetv2_m": 1280}


@pytest.mark.parametrize(("model", "dim"), sorted(PAPER_CNNS.items()))
def test_paper_cnn_dimension(model: str, dim: int) -> None:
    cfg = model_config([f"model={model}", "model.pretrained=false"])
    extractor = instantiate(cfg).freeze()
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        out = extractor(images)
    assert out.shape == (2, dim)
    assert extractor.output_dim() == dim
    assert torch.isfinite(out).all()
    assert not any(p.requires_grad for p in extractor.parameters())


def test_small_images_are_upsampled_to_min_size_and_large_kept() -> None:
    extractor = TimmExtractor(model_name="resnet18.tv_in1k", pretrained=False)
    assert extractor.preprocess(torch.zeros(1, 1, 28, 28, dtype=torch.uint8)).shape == (
        1,
        3,
        32,
        32,
    )
    assert extractor.preprocess(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape[-1] == 64
    fixed = TimmExtractor(model_name="resnet18.tv_in1k", pretrained=False, input_size=224)
    assert fixed.preprocess(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape[-1] == 224


def test_normalisation_uses_the_models_own_statistics() -> None:
    extractor = TimmExtractor(model_name="resnet18.tv_in1k", pretrained=False)
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    x = extractor.preprocess(white)
    mean = torch.tensor(extractor.model.pretrained_cfg["mean"])
    std = torch.tensor(extractor.model.pretrained_cfg["std"])
    torch.testing.assert_close(x[0, :, 0, 0], (1 - mean) / std)


def test_vgg_avg_pool_is_the_conv_map_not_fc7() -> None:
    """timm's VGG head gives 4096-d fc7 features; the paper's Keras VGG19 pooled conv5."""
    extractor = TimmExtractor(model_name="vgg19.tv_in1k", pretrained=False).freeze()
    x = extractor.preprocess(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        expected = extractor.model.forward_features(x).mean(dim=(2, 3))
        out = extractor.embed(x)
    torch.testing.assert_close(out, expected)
    assert out.shape[1] == 512


def test_identity_changes_with_weights_and_preprocessing() -> None:
    a = TimmExtractor(model_name="resnet18.tv_in1k", pretrained=False)
    b = TimmExtractor(model_name="resnet18.a1_in1k", pretrained=False)
    c = TimmExtractor(model_name="resnet18.tv_in1k", pretrained=False, input_size=224)
    assert a.identity() != b.identity()
    assert a.identity() != c.identity()
    assert a.identity() == TimmExtractor(model_name="resnet18.tv_in1k", pretrained=False).identity()


def test_unknown_timm_model_is_a_clear_error() -> None:
    with pytest.raises(CbmirError, match="timm has no model"):
        TimmExtractor(model_name="resnet5000", pretrained=False)


def test_unknown_model_config_lists_choices() -> None:
    """Extractors are picked by model config (`model=...`): a wrong name lists the choices."""
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="model/nonsense") as info:
        compose_config(["model=nonsense"])
    assert {"pixels", "timm", "resnet18"} <= set(info.value.options or ())


def test_pixels_flatten_scaled_without_resizing() -> None:
    extractor = PixelExtractor(pretrained=False)
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    out = extractor(images)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.2, 0.4]]))
    assert extractor.output_dim((3, 28, 28)) == 3 * 28 * 28
