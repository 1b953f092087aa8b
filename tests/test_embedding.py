"""`cbmir.embedding`: what joins the store key (precision) and what does not (channels_last)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cbmir.config import embedder_config, numeric_precision
from cbmir.embedding import FrozenEmbedder, build_embedder, is_conv_net
from cbmir.errors import ConfigError
from cbmir.extractors.pixels import PixelExtractor
from cbmir.extractors.timm_extractor import TimmExtractor
from cbmir.store import make_key
from cbmir.volumes import VolumeSpec
from tests.helpers import compose_config

DATA = {"dataset": "breastmnist", "size": 28, "split": "train", "sha256": "0" * 64}


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return TimmExtractor(model_name="resnet18", pretrained=False)


@pytest.mark.parametrize("name", ["32-true", "32", 32])
def test_float32_keys_are_the_plain_extractor_and_data_key(cnn, name) -> None:
    assert numeric_precision(name) is None
    key = FrozenEmbedder(cnn, precision=name).store_key(DATA)
    assert key == make_key(cnn.identity(), DATA)


def test_reduced_precision_gets_its_own_store_entry(cnn) -> None:
    keys = {
        name: FrozenEmbedder(cnn, precision=name).store_key(DATA)
        for name in ("32-true", "bf16-mixed", "16-mixed", "64-true")
    }
    assert len(set(keys.values())) == 4
    assert FrozenEmbedder(cnn, precision="bf16").store_key(DATA) == keys["bf16-mixed"]


def test_channels_last_is_speed_only_same_key_same_embeddings(cnn) -> None:
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    plain, fast = FrozenEmbedder(cnn), FrozenEmbedder(cnn, channels_last=True)
    assert plain.store_key(DATA) == fast.store_key(DATA)
    with torch.inference_mode():
        expected = plain.predict_step({"image": images}, 0)
        fast.on_predict_start()  # converts the weights, as Lightning does before predicting
        got = fast.predict_step({"image": images}, 0)
    cnn.to(memory_format=torch.contiguous_format)  # the module-scoped model, for other tests
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_channels_last_auto_is_on_for_conv_nets_only(cnn) -> None:
    vit = TimmExtractor(model_name="vit_tiny_patch16_224", pretrained=False)
    pixels = PixelExtractor()
    assert is_conv_net(cnn) and not is_conv_net(vit) and not is_conv_net(pixels)
    assert FrozenEmbedder(cnn, channels_last="auto").channels_last is True
    assert FrozenEmbedder(vit, channels_last="auto").channels_last is False
    assert FrozenEmbedder(pixels, channels_last="auto").channels_last is False
    assert FrozenEmbedder(vit, channels_last=True).channels_last is True
    with pytest.raises(ConfigError, match="true, false or auto"):
        FrozenEmbedder(cnn, channels_last="sometimes")


@pytest.mark.parametrize("precision", ["16-mixed", "64-true"])
def test_query_embeddings_are_the_runs_bit_for_bit_under_its_precision(
    cnn, precision, tmp_path
) -> None:
    """The query tool embeds through `Trainer.predict` as the run did: Lightning's CPU fallback
    of 16-mixed to bf16 and its float64 model, not a hand-made autocast (fp16 / float32)."""
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from cbmir.query.engine import embed_queries
    from tests.helpers import compose_config

    overrides = [f"paths.output_dir={tmp_path}", f"trainer.precision={precision}"]
    cfg = compose_config(["trainer=cpu", *overrides])
    images = list(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8))
    embedder = FrozenEmbedder(copy.deepcopy(cnn), precision=precision)  # 64-true casts it
    query = embed_queries(embedder, images, cfg, device="cpu", batch_size=4)  # first: 64-true
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)  # casts it
    batches = trainer.predict(embedder, DataLoader([{"image": i} for i in images], batch_size=4))
    run = torch.cat(batches).numpy()
    assert query.dtype == run.dtype == np.float32 and query.shape == (6, 512)
    np.testing.assert_array_equal(query, run)


class Doubled(FrozenEmbedder):
    """Another embedder class, to show `embedder._target_` picks what is built."""

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return 2 * super().predict_step(batch, batch_idx, dataloader_idx)


def test_the_embedder_is_instantiated_from_its_config_node(cnn) -> None:
    cfg = compose_config(["channels_last=true", "trainer.precision=bf16-mixed"])
    embedder = build_embedder(cfg, cnn, VolumeSpec(reduce="max"))
    assert type(embedder) is FrozenEmbedder and embedder.extractor is cnn
    assert embedder.channels_last is True and embedder.precision == "bf16-mixed"
    assert type(embedder.volume) is VolumeSpec and embedder.volume == VolumeSpec(reduce="max")
    by_hand = FrozenEmbedder(cnn, volume=VolumeSpec(reduce="max"), precision="bf16-mixed")
    assert embedder.store_key(DATA) == by_hand.store_key(DATA)
    assert build_embedder(cfg, cnn, None).volume is None  # 2D data: no volume in the key
    other = compose_config(["embedder._target_=tests.test_embedding.Doubled"])
    assert type(build_embedder(other, cnn, None)) is Doubled


def test_a_run_config_from_before_the_embedder_node_keys_as_it_did(cnn) -> None:
    """The query tool reads old runs' `config_resolved.yaml`: same embedder, same store key."""
    cfg = compose_config(["trainer.precision=16-mixed", "channels_last=false"])
    old = OmegaConf.create(OmegaConf.to_container(cfg))
    del old["embedder"]
    new, before = build_embedder(cfg, cnn, None), build_embedder(old, cnn, None)
    assert before.store_key(DATA) == new.store_key(DATA)
    assert before.store_key(DATA) == FrozenEmbedder(cnn, precision="16-mixed").store_key(DATA)
    assert (before.channels_last, before.precision) == (False, "16-mixed")


def test_a_resolved_run_config_follows_precision_overrides(tmp_path) -> None:
    """`config_resolved.yaml` holds `embedder.precision` as a value; a query override of
    trainer.precision must still reach the store key, as it did before the node existed."""
    from cbmir.query.database import RUN_CONFIG, RUN_METRICS, load_run_config

    cfg = compose_config(["model=pixels", f"paths.output_dir={tmp_path}"])
    (tmp_path / RUN_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (tmp_path / RUN_METRICS).write_text("{}")
    loaded, _ = load_run_config(tmp_path, ["trainer.precision=bf16-mixed", "channels_last=true"])
    node = embedder_config(loaded)
    assert (node["precision"], node["channels_last"]) == ("bf16-mixed", True)
    assert embedder_config(load_run_config(tmp_path)[0]) == embedder_config(cfg)
