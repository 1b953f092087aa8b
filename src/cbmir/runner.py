"""The runner API every command shares: one job wrapper (user errors -> one line, `error.json`,
exit code 2), one entry point around a `@hydra.main`, logger building, config composition.

`cbmir`, `cbmir-finetune` and `cbmir-query` go through these functions; nothing above this
layer reaches into another command's private state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cbmir.config import config_dir, is_multirun
from cbmir.errors import CbmirError
from cbmir.resolvers import register_resolvers

log = logging.getLogger("cbmir")

#: jobs of this process that failed (a multirun goes on past them; the exit status says so)
_FAILED_JOBS: list[str] = []


def user_error(exc: BaseException) -> CbmirError | None:
    """The CbmirError behind an exception (Hydra's instantiate wraps what targets raise)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CbmirError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run_job(cfg: DictConfig, job: Callable[[DictConfig], object]) -> object:
    """Run one job; a user error becomes one log line and `error.json`, not a traceback."""
    try:
        return job(cfg)
    except Exception as raised:
        exc = user_error(raised) or raised
        is_user_error = isinstance(exc, CbmirError)
        name = cfg.get("run_name", "job")
        if is_user_error:
            log.error("%s: %s", name, exc)
        else:
            log.exception("%s failed with an unexpected error", name)
        _write_error(cfg, exc)
        if is_multirun():
            _FAILED_JOBS.append(str(name))
            return None
        raise SystemExit(2 if is_user_error else 1) from None


def run_command(prog: str, command: Callable[[], int]) -> int:
    """The job wrapper of a plain (argparse) command: a user error is one line
    `prog: error: ...` on stderr and exit code 2; a bug keeps its traceback."""
    try:
        return command()
    except Exception as raised:
        exc = user_error(raised)  # Hydra's instantiate wraps what targets raise
        if exc is None:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def _write_error(cfg: DictConfig, exc: BaseException) -> None:
    """`error.json` in the job's folder, where that folder can take it (it may be the problem)."""
    from cbmir.io_utils import write_json

    with contextlib.suppress(OSError, OmegaConfBaseException):
        out = Path(cfg.paths.output_dir)
        write_json(out / "error.json", {"error": str(exc), "type": type(exc).__name__})


def _no_litlogger(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_library_logging() -> None:
    """Import Lightning with its console output as every command has it: a job calls this
    after validation, before its first Lightning import (so bad input fails without one).

    Lightning gives its loggers a console handler of their own and stops their propagation
    when the root logger has no handler at import time (before Hydra's logging is set up, as
    when this ran at process start): both are set here whatever the import order, so the
    handler is never doubled and Lightning's info chatter stays out of the job log. Idempotent:
    a sweep calls it once per job."""
    import lightning.pytorch  # noqa: F401  (its handlers are attached on import)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = False
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_litlogger not in rank_zero.filters:
        rank_zero.addFilter(_no_litlogger)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # the same filter is kept once


def main_entry(prog: str, hydra_main: Callable[[], object]) -> None:
    """Run a `@hydra.main` function as command `prog`: resolvers registered, and exit status 1
    when any job of a multirun failed. Lightning is not imported here: each job calls
    `quiet_library_logging` once its input is validated."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    register_resolvers()
    hydra_main()
    if _FAILED_JOBS:
        print(
            f"{prog}: {len(_FAILED_JOBS)} job(s) failed: {', '.join(_FAILED_JOBS)}", file=sys.stderr
        )
        sys.exit(1)


def compose(
    config_name: str = "config", overrides: Sequence[str] = (), return_hydra_config: bool = False
) -> DictConfig:
    """A config composed outside `@hydra.main` (query tool, scripts, tests), resolvers ready."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(
                config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
            )
    finally:
        GlobalHydra.instance().clear()


def build_loggers(cfg: DictConfig, job_type: str | None = None) -> list[Any]:
    """The job's Lightning loggers from `cfg.logger`; `job_type` overrides a W&B run's."""
    from hydra.utils import instantiate

    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None or "_target_" not in conf:
            continue
        log.info("logger %s", name)
        wandb = str(conf._target_).endswith("WandbLogger")
        loggers.append(instantiate(conf, **({"job_type": job_type} if job_type and wandb else {})))
    return loggers


def finish_loggers(loggers: list[Any], status: str) -> None:
    """Close every logger; a W&B run is finished so the next sweep job starts its own."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)
