"""`cbmir-finetune`: the Hydra entry point of fine-tuning (primary config `configs/finetune.yaml`,
same data / model / trainer / logger / paths groups as `cbmir`). Thin on purpose: the job is
`cbmir.finetune.run.run_finetune`; errors are reported like `cbmir`'s (one line + error.json)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from cbmir.cli import FAILED_JOBS, _quiet_library_logging, run_job
from cbmir.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="finetune")
def _main(cfg: DictConfig) -> object:
    from cbmir.finetune.run import run_finetune

    return run_job(cfg, run_finetune)


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    _quiet_library_logging()
    _main()
    if FAILED_JOBS:
        print(
            f"cbmir-finetune: {len(FAILED_JOBS)} job(s) failed: {', '.join(FAILED_JOBS)}",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
