"""`cbmir`: the Hydra entry point. Thin on purpose; the work is in `cbmir.pipeline`, the job
wrapper in `cbmir.runner`."""

from __future__ import annotations

import sys

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cbmir.config import config_dir
from cbmir.errors import CbmirError
from cbmir.runner import main_entry, quiet_library_logging, run_job
from cbmir.validation import validate_job


class OutputDirCheck(Callback):
    """Hydra creates a job's folder before any cbmir code runs, and an unwritable one (a
    `paths.log_dir` under a file, a read-only disk) ends in its traceback: check it first."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        _check_hydra_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        _check_hydra_dir(config, "hydra.sweep.dir")


def _check_hydra_dir(config: DictConfig, key: str) -> None:
    """One line on stderr and exit code 2 when the folder at `key` cannot take files."""
    from omegaconf import OmegaConf

    from cbmir.validation import OUTPUT_HINT, writable_dir

    try:
        writable_dir(str(OmegaConf.select(config, key)), key, OUTPUT_HINT)
    except CbmirError as exc:
        print(f"cbmir: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _main(cfg: DictConfig) -> object:
    return run_job(cfg, _retrieval_job)


def _retrieval_job(cfg: DictConfig) -> object:
    """Validate before the pipeline's imports (Lightning, torchmetrics, the extractors: some
    seconds), so bad input fails in about one; the settings go on, checked once."""
    settings = validate_job(cfg)
    quiet_library_logging()
    from cbmir.pipeline import run_retrieval

    return run_retrieval(cfg, settings)


def main() -> None:
    main_entry("cbmir", _main)


if __name__ == "__main__":
    main()
