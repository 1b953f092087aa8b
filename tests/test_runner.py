"""`cbmir.runner`: the API every command shares (compose with resolvers, job wrapper, loggers)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cbmir.errors import ConfigError
from cbmir.runner import build_loggers, compose, run_job, user_error


def test_compose_registers_the_resolvers_itself() -> None:
    cfg = compose("config", ["retrieval.k=3", "data.synthetic=true"])
    assert list(cfg.retrieval.acc_ks) == [1, 3]  # ${cbmir_acc_ks:...}
    assert cfg.data.root == cfg.paths.synthetic_root  # ${cbmir_if:...}
    assert compose("finetune").run_name  # the fine-tune config resolves too


def test_user_error_unwraps_what_instantiate_wraps() -> None:
    try:
        try:
            raise ConfigError("bad k")
        except ConfigError as inner:
            raise RuntimeError("Error in call to target") from inner
    except RuntimeError as outer:
        assert isinstance(user_error(outer), ConfigError)
    assert user_error(ValueError("a bug")) is None


def test_a_programming_error_is_not_a_user_error(tmp_path) -> None:
    cfg = OmegaConf.create({"run_name": "job", "paths": {"output_dir": str(tmp_path)}})

    def buggy(_cfg):
        raise KeyError("a bug")

    with pytest.raises(SystemExit) as exit_:
        run_job(cfg, buggy)
    assert exit_.value.code == 1  # a traceback in the log, not the user-error code 2
    assert (tmp_path / "error.json").is_file()


def test_loggers_are_built_from_the_config(tmp_path) -> None:
    cfg = OmegaConf.create(
        {
            "logger": {
                "csv": {
                    "_target_": "lightning.pytorch.loggers.CSVLogger",
                    "save_dir": str(tmp_path),
                },
                "off": None,
            }
        }
    )
    loggers = build_loggers(cfg, job_type="finetune")  # job_type: W&B loggers only
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
