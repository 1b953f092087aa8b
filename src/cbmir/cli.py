"""`cbmir`: the Hydra entry point. Thin on purpose; the work is in `cbmir.pipeline`."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cbmir.config import config_dir
from cbmir.errors import CbmirError

log = logging.getLogger("cbmir")

#: jobs of this process that failed (a multirun goes on past them; the exit status says so)
FAILED_JOBS: list[str] = []


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig, job: Callable[[DictConfig], object]) -> object:
    """Run one job; a user error becomes one log line and `error.json`, not a traceback."""
    from cbmir.io_utils import write_json

    try:
        return job(cfg)
    except Exception as raised:
        exc = _user_error(raised) or raised
        user_error = isinstance(exc, CbmirError)
        name = cfg.get("run_name", "job")
        if user_error:
            log.error("%s: %s", name, exc)
        else:
            log.exception("%s failed with an unexpected error", name)
        try:
            out = Path(cfg.paths.output_dir)
            write_json(out / "error.json", {"error": str(exc), "type": type(exc).__name__})
        except Exception:  # the output dir itself may be the problem
            pass
        if _is_multirun():
            FAILED_JOBS.append(str(name))
            return None
        raise SystemExit(2 if user_error else 1) from None


def _user_error(exc: BaseException) -> CbmirError | None:
    """The CbmirError behind an exception (Hydra's instantiate wraps what targets raise)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CbmirError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
    from cbmir.pipeline import run_retrieval

    return run_job(cfg, run_retrieval)


def _quiet_library_logging() -> None:
    """Lightning adds its own console handler; Hydra's logging already prints (and files) it."""
    import lightning.pytorch  # noqa: F401  (its handlers are attached on import)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    _quiet_library_logging()
    _main()
    if FAILED_JOBS:
        print(f"cbmir: {len(FAILED_JOBS)} job(s) failed: {', '.join(FAILED_JOBS)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
