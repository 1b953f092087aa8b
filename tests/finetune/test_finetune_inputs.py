"""Objectives, configs and bad input: clear errors before any training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbmir.errors import CbmirError, ConfigError, DataError
from cbmir.extractors.checkpoint import CheckpointError
from cbmir.finetune.checkpoint import checkpoint_info, load_finetuned
from cbmir.finetune.data import FinetuneData, QuerySplitAccess
from cbmir.finetune.losses import OBJECTIVES, make_objective
from cbmir.finetune.run import run_finetune
from tests.helpers import compose_config

from .conftest import compose_finetune


@pytest.mark.parametrize("name", OBJECTIVES)
def test_each_objective_gives_a_finite_loss_with_gradients(name) -> None:
    torch.manual_seed(0)
    emb = torch.randn(12, 8, requires_grad=True)
    labels = torch.arange(12).remainder(3).unsqueeze(1)
    objective = make_objective(name, dim=8, num_classes=3, multilabel=False, normalized=False)
    loss = objective(torch.nn.functional.normalize(emb, dim=1), labels)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_metric_objectives_refuse_multilabel_data() -> None:
    with pytest.raises(ConfigError, match="classification"):
        make_objective("supcon", dim=8, num_classes=3, multilabel=True, normalized=True)
    loss = make_objective(
        "classification", dim=8, num_classes=3, multilabel=True, normalized=False
    )(torch.randn(4, 8), torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]))
    assert torch.isfinite(loss)


def test_every_objective_and_strategy_composes() -> None:
    for objective in OBJECTIVES:
        for strategy in ("full", "last_block", "projection_head"):
            cfg = compose_finetune(
                [f"finetune.objective={objective}", f"finetune.strategy={strategy}"]
            )
            assert cfg.finetune.name == f"resnet50-{objective}-{strategy}"
            assert cfg.task_name == "finetune" and cfg.retrieval.k == 5


def test_finetuned_model_config_takes_its_checkpoint_from_a_sweep_key(tmp_path) -> None:
    cfg = compose_config(["model=finetuned", f"+finetuned_checkpoint={tmp_path / 'x.ckpt'}"])
    assert cfg.model.checkpoint == str(tmp_path / "x.ckpt")
    assert cfg.model.name == "finetuned"  # unreadable file: the default name
    assert cfg.model.sha256 is None  # no file yet
    assert compose_config(["model=finetuned"]).model.checkpoint is None
    assert checkpoint_info(None, "name") == "finetuned"
    # the file's hash is part of the config, so a resumable sweep re-runs when the file changes
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"one")
    first = checkpoint_info(path, "sha256")
    assert first == compose_config(["model=finetuned", f"model.checkpoint={path}"]).model.sha256
    path.write_bytes(b"other")
    assert checkpoint_info(path, "sha256") not in (None, first)


def test_model_finetuned_without_or_with_a_foreign_checkpoint_says_what_to_do(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model.checkpoint=RUN_DIR/best.ckpt"):
        load_finetuned(None)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="model=<base model> model.checkpoint"):
        load_finetuned(plain)
    with pytest.raises(CheckpointError, match="not found"):
        load_finetuned(tmp_path / "missing.ckpt")


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            ["finetune.objective=arcface"],
            ConfigError,
            "choose one of supcon, triplet, classification",
        ),
        (
            ["finetune.strategy=half"],
            ConfigError,
            "choose one of full, last_block, projection_head",
        ),
        (["finetune.max_epochs=0"], ConfigError, "max_epochs"),
        (["finetune.resume=/no/such/last.ckpt"], ConfigError, "no checkpoint at"),
        (["data.query_split=val"], ConfigError, "query split"),
        (["finetune.batch_size=1"], ConfigError, "batch_size"),
        (["+finetune.learning_rate=0.1"], ConfigError, "unknown key finetune.learning_rate"),
        (["finetune.lr=fast"], ConfigError, "finetune.lr must be a number, got 'fast'"),
        (["finetune.augment.scale=[1.1]"], ConfigError, r"augment.scale must be \[min, max\]"),
        # a quoted word is not read as a yes/no: bool('false') made it True before
        (["finetune.normalize='false'"], ConfigError, "normalize must be true or false, got 'f"),
    ],
)
def test_bad_settings_fail_before_training(
    finetune_cfg, tmp_path, overrides, error, message
) -> None:
    with pytest.raises(error, match=message):
        run_finetune(finetune_cfg(*overrides))
    assert not list((tmp_path / "run").glob("*.ckpt"))


def test_no_val_split_and_query_split_access_are_refused(tmp_path, tiny_npz) -> None:
    from cbmir.data import NpzDataModule

    arrays = dict(np.load(tiny_npz))
    no_val = tmp_path / "noval.npz"
    np.savez(no_val, **{k: v for k, v in arrays.items() if not k.startswith("val_")})
    with pytest.raises(DataError, match="no val split"):
        FinetuneData(NpzDataModule(path=no_val), batch_size=8)
    data = FinetuneData(NpzDataModule(path=tiny_npz), batch_size=8)
    with pytest.raises(QuerySplitAccess):
        data._dataset("test")
    assert not issubclass(QuerySplitAccess, CbmirError)  # a bug, not a user error
