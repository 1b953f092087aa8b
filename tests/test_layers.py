"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml) are kept,
and the low layers load without the runner (Hydra resolvers are the entry points' business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_are_kept() -> None:
    """`lint-imports`, as `.ci/run` calls it."""
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    run = subprocess.run(
        [sys.executable, "-c", command, "--no-cache"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_an_extractor_and_the_embedder_load_without_the_runner() -> None:
    """Importing them used to register the resolvers and so import the sweep machinery."""
    script = (
        "import json, sys\n"
        "import cbmir.extractors.timm_extractor, cbmir.embedding, cbmir.config\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cbmir.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = set(json.loads(out.stdout))
    assert "cbmir.embedding" in loaded
    above = {"cbmir.sweeps", "cbmir.resume", "cbmir.resolvers", "cbmir.runner", "cbmir.pipeline"}
    assert not loaded & above, sorted(loaded & above)
    assert not any(m.startswith(("cbmir.finetune", "cbmir.report")) for m in loaded)
