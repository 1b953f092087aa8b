"""A Hydra callback that builds the sweep's report when a multirun ends.

The sweep presets (`experiment=paper`, `smoke`, ...) register it, so `cbmir -m experiment=...`
ends with `SWEEP_DIR/report/` written, and, when the jobs logged to W&B, with the summary run
in their group. It runs in the launching process after every job (locally or on SLURM) and
never fails the sweep: a report problem is one warning, and `cbmir-report` can redo it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cbmir.errors import CbmirError

log = logging.getLogger(__name__)


def uses_wandb(config: DictConfig) -> bool:
    """Whether the sweep's jobs log to W&B (a WandbLogger among `logger`)."""
    loggers = OmegaConf.select(config, "logger", default=None) or {}
    return any(
        isinstance(conf, DictConfig) and str(conf.get("_target_", "")).endswith("WandbLogger")
        for conf in loggers.values()
    )


class SweepReport(Callback):
    """`on_multirun_end`: `cbmir-report SWEEP_DIR [--reference] [--wandb]`, in process."""

    def __init__(self, reference: bool = True, wandb: bool | str = "auto") -> None:
        self.reference = bool(reference)
        self.wandb = wandb

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            from cbmir.report.build import build_report

            sweep_dir = Path(str(config.hydra.sweep.dir))
            report = build_report(sweep_dir, reference=self.reference)
            print(f"cbmir: report {report.summary()} -> {report.out_dir / 'report.md'}")
            want = uses_wandb(config) if str(self.wandb) == "auto" else bool(self.wandb)
            if want:
                from cbmir.report.wandb_summary import flush, log_summary

                log_summary(report)
                flush()  # the sweep is over: nothing else of this process logs to W&B
        except Exception as exc:  # noqa: BLE001  the jobs' results are safe; it can be redone
            expected = isinstance(exc, CbmirError | OSError)  # else a bug: show its traceback
            log.warning(
                "sweep report failed (%s); run `cbmir-report SWEEP_DIR` to retry",
                exc,
                exc_info=not expected,
            )
