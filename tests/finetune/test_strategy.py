"""Which parameters each strategy trains, on real timm architectures (random weights)."""

from __future__ import annotations

import pytest
import torch

from cbmir.errors import ConfigError
from cbmir.extractors.base import Extractor
from cbmir.extractors.timm_extractor import TimmExtractor
from cbmir.finetune.extractor import FineTunedExtractor, ProjectionHead
from cbmir.finetune.strategy import apply_strategy, last_block_parameters

SHAPE = (1, 32, 32)


def _wrap(model_name: str, head: bool = False, **kw) -> FineTunedExtractor:
    base = TimmExtractor(model_name=model_name, pretrained=False, input_size=None, **kw)
    proj = ProjectionHead(base.output_dim(), 8) if head else None
    return FineTunedExtractor(base, proj)


def _trainable(extractor: FineTunedExtractor) -> set[str]:
    return {n for n, p in extractor.base.named_parameters() if p.requires_grad}


def test_full_trains_everything_and_projection_head_only_the_head() -> None:
    ext = _wrap("test_resnet", head=True)
    assert apply_strategy(ext, "full", SHAPE) == []
    assert _trainable(ext) == {n for n, _ in ext.base.named_parameters()}
    frozen = apply_strategy(ext, "projection_head", SHAPE)
    assert frozen == [ext.base] and _trainable(ext) == set()
    assert all(p.requires_grad for p in ext.head.parameters())
    with pytest.raises(ConfigError, match="projection head"):
        apply_strategy(_wrap("test_resnet"), "projection_head", SHAPE)
    with pytest.raises(ConfigError, match="choose one of full, last_block, projection_head"):
        apply_strategy(ext, "everything", SHAPE)


@pytest.mark.parametrize(
    ("model_name", "kwargs", "first", "also"),
    [
        ("test_resnet", {}, "model.layer4.", ()),  # the last stage
        (
            "test_vit",
            {"pool": "cls", "model_kwargs": {"img_size": 32}},
            "model.blocks.5.",
            ("model.norm.",),
        ),
        # a trailing norm-only group (ConvNeXt's head.norm) comes with the stage before it
        ("test_convnext", {"pool": "head"}, "model.stages.3.", ("model.head.norm.",)),
    ],
)
def test_last_block_is_the_last_stage_plus_what_follows(model_name, kwargs, first, also) -> None:
    ext = _wrap(model_name, **kwargs)
    frozen = apply_strategy(ext, "last_block", (3, 32, 32))
    trainable = _trainable(ext)
    assert trainable and all(n.startswith((first, *also)) for n in trainable)
    assert any(n.startswith(first) for n in trainable)
    for prefix in also:  # trailing norms (ConvNeXt's head.norm, ViT's norm) come with the block
        assert any(n.startswith(prefix) for n in trainable)
    # frozen normalisation layers stay in eval mode (their running statistics stay put)
    assert frozen and all(not any(p.requires_grad for p in m.parameters()) for m in frozen)


def test_last_block_skips_parameters_the_embedding_never_reaches() -> None:
    # average pooling of the last feature map bypasses timm's head (ConvNeXt's head.norm here,
    # VGG's 100 M-parameter pre_logits in the paper's VGG19): training those would do nothing
    base = TimmExtractor(model_name="test_convnext", pretrained=False, pool="avg", input_size=None)
    names = last_block_parameters(base, (3, 32, 32))
    assert names and all(n.startswith("model.stages.3.") for n in names)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_frozen_parts_stay_in_eval_mode_when_the_module_trains() -> None:
    from cbmir.finetune.module import RetrievalFineTuner

    ext = _wrap("test_resnet")
    module = RetrievalFineTuner(
        ext,
        {},
        objective="classification",
        strategy="last_block",
        image_shape=(1, 28, 28),
        num_classes=3,
    )
    module.train()
    bn_layer1 = ext.base.model.layer1[0].bn1
    bn_layer4 = ext.base.model.layer4[0].bn1
    assert not bn_layer1.training and bn_layer4.training
    before = bn_layer1.running_mean.clone()
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    loss = module.training_step({"image": x, "label": torch.tensor([[0], [1], [2], [0]])}, 0)
    loss.backward()
    assert torch.equal(bn_layer1.running_mean, before)
    assert ext.base.model.layer4[0].conv1.weight.grad is not None
    assert ext.base.model.layer1[0].conv1.weight.grad is None


class _ToyTower(Extractor):
    """A non-timm network: a stem, a stack of identical blocks, a final norm."""

    name = "toy"

    def __init__(self) -> None:
        super().__init__(input_size=None, min_size=None)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.norm = torch.nn.LayerNorm(8)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x).relu()
        return self.norm(x.mean(dim=(2, 3)))

    def output_dim(self, image_shape=None) -> int:
        return 8


def test_last_block_of_a_non_timm_network_is_its_last_repeated_block() -> None:
    names = last_block_parameters(_ToyTower(), (3, 16, 16))
    assert names == {"blocks.2.weight", "blocks.2.bias", "norm.weight", "norm.bias"}
