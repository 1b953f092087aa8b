"""Bad input fails before the heavy imports: validating a job (config, paths, data.path) loads
neither Lightning nor torchmetrics nor torch nor a model library, and Lightning's logging is
quietened where a job first imports it, not at process start (docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import run_cbmir_in

#: what validation must not import (each costs seconds; together ~8 s before this rule)
HEAVY = ("lightning", "torchmetrics", "timm", "open_clip", "torch")

_PROBE = """
import json, logging, sys
import cbmir.cli, cbmir.finetune.cli, cbmir.query.cli, cbmir.validation
from cbmir.resolvers import register_resolvers
register_resolvers()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})

logging.basicConfig(format="[%(name)s] %(message)s")  # a root handler first, as Hydra's
from cbmir.runner import quiet_library_logging
quiet_library_logging()
quiet_library_logging()  # a sweep's second job
pl = logging.getLogger("lightning.pytorch")
rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
pl.info("lightning chatter")
rank_zero.warning("litlogger advert")
rank_zero.warning("a lightning warning")
print(json.dumps({{"heavy": heavy, "handlers": len(pl.handlers), "filters": len(rank_zero.filters)}}))
"""


def test_the_validation_path_imports_no_heavy_library() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=set(HEAVY))],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["heavy"] == []  # resolvers, validation and the entry points' modules
    assert state["handlers"] == 0 and state["filters"] == 1  # quietened once, not per call
    assert "lightning chatter" not in proc.stderr  # no info lines of Lightning's in the log
    assert "litlogger" not in proc.stderr
    assert proc.stderr.count("a lightning warning") == 1  # warnings still shown, never twice


def _imported(stderr: str) -> set[str]:
    """Top-level packages named in `-X importtime` lines (PYTHONPROFILEIMPORTTIME=1)."""
    names = (line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines())
    return {name.split(".")[0] for name in names if name}


def test_a_missing_data_folder_fails_before_lightning_is_imported(dirs, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    missing = dirs["data"] / "no-such-folder"
    proc = run_cbmir_in(["data=folder", f"data.path={missing}", "model=pixels"], dirs, check=False)
    timing = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    said = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and not line.startswith("import time:")
    ]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(said) == 1 and "ERROR" in said[0], said
    assert f"data.path={missing} is not a folder" in said[0]
    imported = _imported("\n".join(timing))
    assert "cbmir" in imported and "hydra" in imported  # the profile covers the whole run
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))
