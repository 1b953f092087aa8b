"""Every config group option composes (lightning-hydra-template style)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import compose_config, config_options

NEEDS_PATH = {"npz"}


def test_default_is_the_papers_main_job() -> None:
    cfg = compose_config()
    assert cfg.model.name == "resnet50" and cfg.model.pretrained is True
    assert cfg.data.flag == "breastmnist" and cfg.data.size == 28
    assert cfg.retrieval.k == 5 and cfg.retrieval.distance == "euclidean"
    assert (cfg.data.query_split, cfg.data.database_split) == ("test", "train")


@pytest.mark.parametrize("option", config_options("data"))
def test_every_data_config_composes(option: str) -> None:
    overrides = [f"data={option}"]
    if option in NEEDS_PATH:
        overrides.append("data.path=/tmp/x.npz")
    if option == "medmnist":
        overrides.append("data.flag=breastmnist")
    cfg = compose_config(overrides)
    assert OmegaConf.select(cfg, "data._target_", default=None)
    assert cfg.data.query_split in ("train", "val", "test")


@pytest.mark.parametrize("option", config_options("model"))
def test_every_model_config_composes(option: str) -> None:
    cfg = compose_config([f"model={option}", "model.pretrained=false"])
    assert cfg.model._target_ and cfg.model.name is not None


@pytest.mark.parametrize("group", ["retrieval", "trainer", "logger", "experiment"])
def test_every_other_group_composes(group: str) -> None:
    for option in config_options(group):
        cfg = compose_config([f"{group}={option}"])
        assert cfg is not None


def test_trainer_config_instantiates() -> None:
    cfg = compose_config(["trainer=cpu"])
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir="/tmp/cbmir-test")
    assert trainer.predicting is False


def test_synthetic_data_never_shares_the_real_root() -> None:
    real = compose_config()
    fake = compose_config(["data.synthetic=true"])
    assert real.data.root != fake.data.root
    assert fake.data.root == fake.paths.synthetic_root
