"""Volumes through 2D extractors (`cbmir.volumes` + `FrozenEmbedder`): order, sizes, reductions,
tri-planar slicing and slice batching, with real extractors (pixels, a timm CNN, random weights)."""

from __future__ import annotations

import pytest
import torch

from cbmir.embedding import FrozenEmbedder
from cbmir.errors import ConfigError
from cbmir.extractors.pixels import PixelExtractor
from cbmir.extractors.timm_extractor import TimmExtractor
from cbmir.store import make_key
from cbmir.volumes import VolumeSpec, slices_along, split_model_config
from tests.helpers import compose_config

DATA = {"name": "toy", "split": "test"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The reference loops run one slice per forward pass: on a busy 2-core machine, thread
    synchronisation dominates such tiny passes, so they run single-threaded here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cnn() -> TimmExtractor:
    """A real timm CNN, random weights, fed at the slice's own size (no min_size upsizing)."""
    torch.manual_seed(0)
    return TimmExtractor("test_resnet", pretrained=False, pool="avg", min_size=None)


def volumes(b: int = 3, shape: tuple[int, int, int] = (5, 6, 7), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, *shape), dtype=torch.uint8, generator=gen)


def embed(extractor, vols: torch.Tensor, **spec) -> tuple[torch.Tensor, int]:
    embedder = FrozenEmbedder(extractor, volume=VolumeSpec(**spec))
    with torch.inference_mode():
        feats = embedder.embed_images(vols)
    return feats, embedder.output_dim(tuple(vols.shape[1:]))


def per_slice(extractor, vols: torch.Tensor, axis: int) -> torch.Tensor:
    """[B, n, dim]: each slice embedded alone (one forward pass per slice)."""
    plain = FrozenEmbedder(extractor)
    with torch.inference_mode():
        rows = [
            torch.stack([plain.embed_images(s[None, None]) for s in v.movedim(axis, 0)])[:, 0]
            for v in vols
        ]
    return torch.stack(rows)


# -- concat: order and size ---------------------------------------------------------------------
def test_pixel_concat_is_the_volume_in_slice_order() -> None:
    vols = volumes()
    feats, dim = embed(PixelExtractor(), vols, slice_batch_size=4)  # chunks cross volumes
    assert feats.shape == (3, dim) and dim == 5 * 6 * 7
    assert torch.equal(feats, vols.flatten(1).float() / 255)


def test_cnn_concat_puts_each_slice_block_in_order(cnn) -> None:
    # every slice distinguishable: slice s is a constant image of grey level 40 * s + 10
    levels = torch.arange(5, dtype=torch.uint8) * 40 + 10
    vol = levels.view(1, 5, 1, 1).expand(2, 5, 16, 16).contiguous()
    vol[1] = vol[1].flip(0)  # second volume: slices in reverse order
    feats, dim = embed(cnn, vol, slice_batch_size=3)
    width = cnn.output_dim()
    assert dim == 5 * width and feats.shape == (2, dim)
    blocks = feats.view(2, 5, width)
    single = per_slice(cnn, vol[:1], axis=0)[0]  # [5, width] in slice order
    assert torch.allclose(blocks[0], single, atol=1e-5)
    assert torch.allclose(blocks[1], single.flip(0), atol=1e-5)
    # the blocks really differ (a constant slice of another grey level gives other features)
    assert torch.cdist(single, single).fill_diagonal_(1).min() > 1e-3


# -- mean / max ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch_and_slices(cnn) -> tuple[torch.Tensor, torch.Tensor]:
    """3 volumes of 5 slices and their slice features, one forward pass per slice [3, 5, dim]."""
    vols = volumes(b=3, shape=(5, 16, 16))
    return vols, per_slice(cnn, vols, axis=0)


def test_mean_and_max_reduce_the_slice_features(cnn, batch_and_slices) -> None:
    vols, slices = batch_and_slices
    for reduce, expected in (("mean", slices.mean(1)), ("max", slices.amax(1))):
        feats, dim = embed(cnn, vols, reduce=reduce, slice_batch_size=4)
        assert dim == cnn.output_dim() and feats.shape == (3, dim)
        assert torch.allclose(feats, expected, atol=1e-5), reduce


def test_pixel_max_along_one_axis_is_a_projection() -> None:
    vols = volumes()
    feats, dim = embed(PixelExtractor(), vols, reduce="max", axes=[2])
    assert dim == 5 * 6  # slices along W are D x H images
    assert torch.equal(feats, vols.amax(dim=3).flatten(1).float() / 255)


# -- tri-planar ---------------------------------------------------------------------------------
def test_slices_along_each_axis_are_the_planes_in_order() -> None:
    vol = volumes(b=1)
    assert torch.equal(slices_along(vol, 0)[2, 0], vol[0, 2])
    assert torch.equal(slices_along(vol, 1)[3, 0], vol[0, :, 3, :])
    assert torch.equal(slices_along(vol, 2)[4, 0], vol[0, :, :, 4])
    assert slices_along(volumes(b=2), 1).shape == (2 * 6, 1, 5, 7)


def test_tri_planar_joins_the_three_axes_in_order(cnn) -> None:
    vols = volumes(b=2, shape=(4, 6, 8))  # non-cubic: each axis has its own slices
    feats, dim = embed(cnn, vols, axes=[2, 0, 1], slice_batch_size=5)
    width = cnn.output_dim()
    assert dim == width * (4 + 6 + 8) and feats.shape == (2, dim)
    per_axis = [per_slice(cnn, vols, axis=a) for a in (0, 1, 2)]  # [2, n_a, width] each
    assert torch.allclose(feats, torch.cat([p.flatten(1) for p in per_axis], 1), atol=1e-5)
    feats, dim = embed(cnn, vols, reduce="mean", axes=[0, 1, 2])
    assert dim == 3 * width
    assert torch.allclose(feats, torch.cat([p.mean(1) for p in per_axis], 1), atol=1e-5)


def test_tri_planar_pixel_dimension_counts_every_plane() -> None:
    vols = volumes()
    feats, dim = embed(PixelExtractor(), vols, axes=[0, 1, 2])
    assert dim == 3 * 5 * 6 * 7 == feats.shape[1]
    feats, dim = embed(PixelExtractor(), vols, reduce="mean", axes=[0, 1, 2])
    assert dim == 6 * 7 + 5 * 7 + 5 * 6 == feats.shape[1]


# -- slice batching -----------------------------------------------------------------------------
def test_slice_batching_equals_one_slice_per_forward(cnn, batch_and_slices) -> None:
    vols, slices = batch_and_slices  # 15 slices: chunks of 4 or 7 straddle volume borders
    for chunk in (1, 4, 7, 1000):
        feats, _ = embed(cnn, vols, slice_batch_size=chunk)
        assert torch.allclose(feats, slices.flatten(1), atol=1e-5), chunk


def test_predict_step_returns_float32_volume_features(cnn) -> None:
    vols = volumes(b=2, shape=(4, 16, 16))
    embedder = FrozenEmbedder(cnn, volume=VolumeSpec(reduce="max"))
    with torch.inference_mode():
        out = embedder.predict_step({"image": vols, "index": torch.arange(2)}, 0)
    assert out.dtype == torch.float32 and out.shape == (2, cnn.output_dim())


# -- settings: validation, identity, config -----------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"reduce": "sum"},
        {"axes": [3]},
        {"axes": [0, 0]},
        {"axes": []},
        {"axes": "0"},
        {"axes": [True]},
        {"slice_batch_size": 0},
        {"slice_batch_size": 2.5},
    ],
)
def test_bad_volume_settings_are_config_errors(kwargs) -> None:
    """Types are the schema's (`VolumeSpec.from_config`, as a config reaches it), ranges the
    spec's own, so a spec built in Python with good types is checked too."""
    with pytest.raises(ConfigError, match="model.volume"):
        VolumeSpec.from_config(kwargs)
    if kwargs not in ({"axes": "0"}, {"axes": [True]}, {"slice_batch_size": 2.5}):
        with pytest.raises(ConfigError, match="model.volume"):
            VolumeSpec(**kwargs)


def test_from_config_rejects_unknown_keys_and_sorts_axes() -> None:
    with pytest.raises(ConfigError, match="reduce, axes, slice_batch_size"):
        VolumeSpec.from_config({"reduction": "mean"})
    assert VolumeSpec.from_config({"axes": [2, 0]}).axes == (0, 2)
    assert VolumeSpec.from_config(None) == VolumeSpec()


def test_volume_settings_key_the_store_but_batching_does_not() -> None:
    extractor = PixelExtractor()
    key = FrozenEmbedder(extractor, volume=VolumeSpec()).store_key(DATA)
    assert key == FrozenEmbedder(extractor, volume=VolumeSpec(slice_batch_size=3)).store_key(DATA)
    for other in (VolumeSpec(reduce="mean"), VolumeSpec(axes=(0, 1, 2))):
        assert FrozenEmbedder(extractor, volume=other).store_key(DATA) != key
    # 2D keys are unchanged by the volume machinery
    assert FrozenEmbedder(extractor).store_key(DATA) == make_key(extractor.identity(), DATA)


def test_every_model_config_gets_volume_defaults_and_instantiates_without_them() -> None:
    cfg = compose_config(["model=timm", "model.model_name=test_resnet", "model.pretrained=false"])
    assert cfg.model.volume.reduce == "concat" and list(cfg.model.volume.axes) == [0]
    model_cfg, spec = split_model_config(cfg.model)
    assert "volume" not in model_cfg and model_cfg["name"] == "test_resnet"  # resolved
    assert spec == VolumeSpec()
    cfg = compose_config(["model=pixels", "model.volume.reduce=max", "model.volume.axes=[0,1,2]"])
    assert split_model_config(cfg.model)[1] == VolumeSpec(reduce="max", axes=(0, 1, 2))
