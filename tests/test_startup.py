"""Bad input fails before the heavy imports: validating a job (config, paths, data.path) loads
neither Lightning nor torchmetrics nor torch nor a model library, and Lightning's logging is
quietened where a job first imports it, not at process start (docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.finetune.conftest import TINY_MODEL, write_tiny_npz
from tests.helpers import cbmir_env, run_cbmir_in

#: what validation must not import (each costs seconds; together ~8 s before this rule)
HEAVY = ("lightning", "torchmetrics", "timm", "open_clip", "torch")

_PROBE = """
import json, logging, sys
import cbmir.cli, cbmir.finetune.cli, cbmir.query.cli, cbmir.validation
from cbmir.errors import ConfigError
from cbmir.finetune.settings import finetune_settings
from cbmir.resolvers import register_resolvers
from cbmir.runner import compose
register_resolvers()
checked = finetune_settings(compose("finetune", ["finetune.objective=triplet"])).objective
refused = None
try:
    finetune_settings(compose("finetune", ["finetune.lr=-1"]))
except ConfigError as exc:
    refused = str(exc)
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
print(json.dumps({{"heavy": heavy, "handlers": len(pl.handlers), "filters": len(rank_zero.filters),
                  "checked": checked, "refused": refused}}))
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
    assert state["checked"] == "triplet"  # cbmir-finetune's settings are checked light too
    assert state["refused"] == "finetune.lr must be >= 0, not -1.0"
    assert state["handlers"] == 0 and state["filters"] == 1  # quietened once, not per call
    assert "lightning chatter" not in proc.stderr  # no info lines of Lightning's in the log
    assert "litlogger" not in proc.stderr
    assert proc.stderr.count("a lightning warning") == 1  # warnings still shown, never twice


def _imported(stderr: str) -> set[str]:
    """Top-level packages named in `-X importtime` lines (PYTHONPROFILEIMPORTTIME=1)."""
    names = (line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines())
    return {name.split(".")[0] for name in names if name}


def _said_and_imported(proc: subprocess.CompletedProcess) -> tuple[list[str], set[str]]:
    """What a run said (its lines other than the import profile) and what it imported."""
    timing = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    said = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and not line.startswith("import time:")
    ]
    imported = _imported("\n".join(timing))
    assert "cbmir" in imported and "hydra" in imported  # the profile covers the whole run
    return said, imported


def test_a_missing_data_folder_fails_before_lightning_is_imported(dirs, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    missing = dirs["data"] / "no-such-folder"
    proc = run_cbmir_in(["data=folder", f"data.path={missing}", "model=pixels"], dirs, check=False)
    said, imported = _said_and_imported(proc)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(said) == 1 and "ERROR" in said[0], said
    assert f"data.path={missing} is not a folder" in said[0]
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))


def test_a_bad_finetune_setting_fails_before_lightning_is_imported(dirs, monkeypatch) -> None:
    """Valid data and model: only `finetune.objective` is wrong, and it is named in about a
    second, before cbmir-finetune imports Lightning and the fine-tuning stack."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    data = write_tiny_npz(dirs["data"] / "tiny.npz")
    args = ["data=npz", f"data.path={data}", *TINY_MODEL, "finetune.objective=nosuch"]
    proc = subprocess.run(
        [sys.executable, "-m", "cbmir.finetune.cli", *args],
        env=cbmir_env(dirs["logs"].parent),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=dirs["logs"].parent,
    )
    said, imported = _said_and_imported(proc)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(said) == 1 and "ERROR" in said[0], said
    assert "finetune.objective" in said[0] and "nosuch" in said[0], said[0]
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))
