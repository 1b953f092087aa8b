"""The sweep presets expand to the paper's grid, compose job by job like plain runs, and the
SLURM launcher config is accepted by submitit. Composition only: nothing runs here."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from cbmir.config import config_dir
from cbmir.report.names import PAPER_DATASETS, PAPER_MODELS
from cbmir.report.reference import load_reference
from cbmir.sweeps import parse_cell
from tests.helpers import compose_config, config_options

PRESETS = ("paper", "paper_cnn", "paper_3d", "paper_text", "smoke")


def expand(experiment: str) -> list[list[str]]:
    """The job overrides Hydra's basic sweeper makes from a preset's `hydra.sweeper.params`."""
    hydra_cfg = compose_config([f"experiment={experiment}"], return_hydra_config=True).hydra
    params = OmegaConf.to_container(hydra_cfg.sweeper.params)
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        (override,) = parser.parse_overrides([f"{key}={value}"])
        axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
    return [[f"experiment={experiment}", *combo] for combo in itertools.product(*axes)]


def job_key(overrides: list[str]) -> tuple[int, str, str]:
    """(size, dataset, model) of a job from its overrides (composing 252 jobs is slow; that a
    cell composes like its data config is checked below, per dataset)."""
    values = dict(o.split("=", 1) for o in overrides)
    if "cell" in values:
        flag, size = parse_cell(values["cell"])
    else:
        flag, size = values["data"], int(values["data.size"])
    model = OmegaConf.load(config_dir() / "model" / f"{values['model']}.yaml")
    return size, flag, str(model.name)


@pytest.mark.parametrize("experiment", PRESETS)
def test_preset_is_an_experiment_option_with_a_stable_sweep_dir(experiment) -> None:
    assert experiment in config_options("experiment")
    hydra_cfg = compose_config([f"experiment={experiment}"], return_hydra_config=True).hydra
    sweep_dir = OmegaConf.to_container(hydra_cfg.sweep, resolve=False)
    assert "now:" not in sweep_dir["dir"]  # re-launching lands in the same directory
    assert sweep_dir["subdir"] == "${cbmir_job_subdir:${run_name}}"
    assert hydra_cfg.callbacks.report._target_ == "cbmir.report.callback.SweepReport"


def test_paper_grid_is_the_papers_tables() -> None:
    jobs = {job_key(overrides) for overrides in expand("paper")}
    assert len(jobs) == 6 * 4 * 9 + 2 * 2 * 9 == 252
    reference = load_reference()
    published = set(zip(reference["size"], reference["dataset"], reference["model"], strict=True))
    assert published <= jobs
    # the only grid job without a published number: MedCLIP on BreastMNIST at 64 px
    assert jobs - published == {(64, "breastmnist", "medclip")}
    assert {model for _, _, model in jobs} == set(PAPER_MODELS)


def test_paper_cnn_and_paper_3d_are_parts_of_paper() -> None:
    paper = {job_key(o) for o in expand("paper")}
    cnn = {job_key(o) for o in expand("paper_cnn")}
    three_d = {job_key(o) for o in expand("paper_3d")}
    assert cnn < paper and len(cnn) == 28 * 4
    assert {m for _, _, m in cnn} == {"vgg19", "resnet50", "densenet121", "efficientnetv2_m"}
    assert three_d < paper and len(three_d) == 36
    assert {d for _, d, _ in three_d} == {"adrenalmnist3d", "synapsemnist3d"}


@pytest.mark.parametrize("flag", PAPER_DATASETS)
def test_a_grid_cell_composes_the_same_data_as_the_datasets_own_config(flag) -> None:
    """`cell=flag@size` (one sweep over a non-Cartesian grid) must equal `data=flag
    data.size=size`, so a data config that grows its own keys is caught here."""
    size = 64
    by_cell = compose_config(["experiment=paper", f"cell={flag}@{size}", "model=vgg19"])
    by_data = compose_config([f"data={flag}", f"data.size={size}", "model=vgg19"])
    assert OmegaConf.to_container(by_cell.data, resolve=True) == OmegaConf.to_container(
        by_data.data, resolve=True
    )


def test_smoke_is_offline_and_at_least_2x2x2() -> None:
    keys = [job_key(o) for o in expand("smoke")]
    assert len({m for _, _, m in keys}) >= 2
    assert len({d for _, d, _ in keys}) >= 2
    assert len({s for s, _, _ in keys}) >= 2
    cfg = compose_config(expand("smoke")[-1])
    assert (cfg.data.size, cfg.data.flag, cfg.model.name) == keys[-1]
    assert cfg.data.synthetic is True and cfg.model.pretrained is False


def test_slurm_launcher_asks_one_gpu_and_one_task_per_job(tmp_path, monkeypatch) -> None:
    """Render the sbatch script with submitit itself, as hydra-submitit-launcher passes the
    parameters: every key of slurm.yaml must be one submitit knows. submitit only checks that
    `srun` exists when the executor is made; a stand-in that is never run satisfies it."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    launcher = compose_config(
        ["hydra/launcher=slurm", "experiment=paper", "hydra.launcher.partition=gpu"],
        return_hydra_config=True,
    ).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    params = OmegaConf.to_container(launcher, resolve=False)
    params.pop("_target_"), params.pop("submitit_folder")
    params["name"] = "cbmir-test"
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(
        folder=tmp_path / "submitit",
        cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m cbmir.cli", "uid")
    for line in ("--gpus-per-node=1", "--ntasks-per-node=1", "--nodes=1", "--partition=gpu"):
        assert f"#SBATCH {line}" in script


def test_default_launcher_stays_local() -> None:
    hydra_cfg = compose_config(["experiment=paper"], return_hydra_config=True).hydra
    assert hydra_cfg.launcher._target_.endswith("BasicLauncher")
    assert Path(__file__).parents[2].joinpath("configs/hydra/launcher/slurm.yaml").is_file()
