"""`cbmir-finetune`: the Hydra entry point of fine-tuning (primary config `configs/finetune.yaml`,
same data / model / trainer / logger / paths groups as `cbmir`). Thin on purpose: the job is
`cbmir.finetune.run.run_finetune`; errors are reported like `cbmir`'s (`cbmir.runner`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cbmir.config import config_dir
from cbmir.finetune.settings import finetune_settings
from cbmir.runner import main_entry, quiet_library_logging, run_job
from cbmir.validation import check_data_source


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="finetune")
def _main(cfg: DictConfig) -> object:
    return run_job(cfg, _finetune_job)


def _finetune_job(cfg: DictConfig) -> object:
    """Bad `finetune.*` settings and a missing data file or folder fail before Lightning and
    the trainer are imported (some seconds); the settings go on, checked once."""
    settings = finetune_settings(cfg)
    check_data_source(cfg)
    quiet_library_logging()
    from cbmir.finetune.run import run_finetune

    return run_finetune(cfg, settings=settings)


def main() -> None:
    main_entry("cbmir-finetune", _main)


if __name__ == "__main__":
    main()
