"""Random weights (`pretrained=false`): every region of the image reaches the embedding, in every
extractor family, and the weights are a pure function of (architecture, init scheme, seed), with
the seed and scheme in the identity (so in the embedding-store key)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.tiny_models import TINY_CONCH, open_clip_with_layer_scale

from cbmir.errors import ConfigError
from cbmir.extractors.conch import ConchExtractor
from cbmir.extractors.medclip import MedClipExtractor
from cbmir.extractors.open_clip_extractor import OpenClipExtractor
from cbmir.extractors.random_init import INIT_SCHEME, region_sensitivity
from cbmir.extractors.timm_extractor import TimmExtractor
from cbmir.store import make_key

#: relative change of the embedding that is more than float32 noise (~1e-7)
VISIBLE = 1e-4
#: an open_clip ViT with layer scale (`ls_init_value`, as in large CLIP towers)
TINY_OPEN_CLIP_LS = open_clip_with_layer_scale(1e-5)


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip") / "open_clip_config.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_LS))
    return str(path)


@pytest.fixture(scope="module")
def digits(digits_npz) -> torch.Tensor:
    """Two real 28 px digits of different classes, [2, 1, 28, 28] uint8."""
    with np.load(digits_npz) as npz:
        images, labels = npz["test_images"], npz["test_labels"][:, 0]
    first = int(np.flatnonzero(labels != labels[0])[0])
    return torch.from_numpy(images[[0, first], None])


def _resnet(**kw):
    return TimmExtractor(model_name="resnet18", **kw)


def _vit(**kw):  # ViT with layer scale 1e-5 (UNI, Virchow, DINOv2 build theirs like this)
    return TimmExtractor(
        model_name="vit_tiny_patch16_224",
        pool="cls",
        input_size=32,
        resize_mode="shortest",
        model_kwargs={"img_size": 32, "patch_size": 8, "init_values": 1e-5},
        **kw,
    )


FAMILIES = {
    "timm-resnet": lambda cfg: _resnet(pretrained=False),
    "timm-vit-layerscale": lambda cfg: _vit(pretrained=False),
    "open_clip-vit-layerscale": lambda cfg: OpenClipExtractor(
        model_name="tiny-clip-ls", model_config=cfg, pretrained=False
    ),
    "conch": lambda cfg: ConchExtractor(architecture=TINY_CONCH, input_size=32, pretrained=False),
    "medclip": lambda cfg: MedClipExtractor(pretrained=False),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_region_of_the_image_changes_a_random_embedding(family, digits, clip_config) -> None:
    extractor = FAMILIES[family](clip_config).freeze()
    # Swin-T at 224 px is the one big network here: one image, quadrants
    images, grid = (digits[:1], 2) if family == "medclip" else (digits, 4)
    with torch.no_grad():
        moved = region_sensitivity(extractor, images, grid=grid)
    assert moved.shape == (len(images), grid * grid)
    blind = np.argwhere(moved <= VISIBLE)
    assert not len(blind), f"cells (image, cell) invisible to {family}: {blind.tolist()}"
    assert extractor.identity()["init"] == INIT_SCHEME


def test_no_residual_branch_or_layer_scale_starts_at_zero(tmp_path) -> None:
    """timm's `zero_init_last` (ResNet bn2), open_clip ModifiedResNet's zeroed bn3 and 1e-5 layer
    scale all switch residual branches (almost) off; random weights keep them on."""
    rn_config = tmp_path / "rn.json"
    vision = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
    rn_config.write_text(json.dumps({"model_cfg": {"embed_dim": 16, "vision_cfg": vision}}))
    models = {
        "timm resnet18": _resnet(pretrained=False).model,
        "open_clip ModifiedResNet": OpenClipExtractor(
            model_name="tiny-rn", model_config=str(rn_config), pretrained=False
        ).model,
        "timm ViT, init_values=1e-5": _vit(pretrained=False).model,
    }
    for label, model in models.items():
        last_norms = {
            name: p
            for name, p in model.named_parameters()
            if name.endswith(("bn2.weight", "bn3.weight")) and "layer" in name
        }
        scales = {name: p for name, p in model.named_parameters() if name.endswith("gamma")}
        assert last_norms or scales, label
        for name, p in {**last_norms, **scales}.items():
            assert p.abs().min() > 0.5, f"{label}: {name} starts at {p.abs().min().item()}"


def _embed(extractor, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return extractor.freeze()(images)


@pytest.mark.parametrize("build", [_vit, _resnet], ids=["vit", "resnet"])
def test_the_seed_picks_the_weights_and_the_store_key(build, digits) -> None:
    a, b = build(pretrained=False, seed=0), build(pretrained=False, seed=1)
    assert (a.identity()["seed"], b.identity()["seed"]) == (0, 1)
    assert make_key(a.identity(), {}) != make_key(b.identity(), {})
    assert not torch.allclose(_embed(a, digits), _embed(b, digits))


def test_the_same_seed_gives_the_same_weights_whatever_came_before() -> None:
    torch.manual_seed(123)
    first = _vit(pretrained=False, seed=7)
    torch.rand(1000)  # the global generator moves on; the weights must not
    state = torch.random.get_rng_state()
    second = _vit(pretrained=False, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # building draws nothing from it
    for (name, p), (_, q) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    assert first.identity() == second.identity()


def test_random_weights_need_an_integer_seed() -> None:
    with pytest.raises(ConfigError, match="integer seed"):
        _vit(pretrained=False, seed=None)


def test_loaded_weights_ignore_the_seed(tmp_path) -> None:
    """The seed only draws random weights: a checkpoint's identity (its store keys) is the same
    for any seed and holds no init fields, so existing keys of loaded weights stay valid."""
    path = tmp_path / "w.pt"
    torch.save(_vit(pretrained=False, seed=3).model.state_dict(), path)
    ident = _vit(checkpoint=str(path), seed=0).identity()
    assert ident == _vit(checkpoint=str(path), seed=1).identity()
    assert "init" not in ident and "seed" not in ident
