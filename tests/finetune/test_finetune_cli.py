"""End to end with the real entry points: `cbmir-finetune` writes RUN_DIR/best.ckpt, then one
`cbmir` multirun evaluates it next to a frozen model with no glue, and its numbers are the
checkpoint's own."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbmir.data import NpzDataModule
from cbmir.extractors.timm_extractor import TimmExtractor
from cbmir.finetune.checkpoint import load_finetuned
from cbmir.retrieval import evaluate_retrieval

from .conftest import TINY_MODEL


def _run(module: str, args: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "CBMIR_STORE": str(root / "store"),
        "CBMIR_LOG_DIR": str(root / "logs"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _embed(extractor, dm: NpzDataModule, split: str):
    with torch.no_grad():
        return extractor(torch.from_numpy(dm.images(split).copy()).unsqueeze(1)).numpy()


def test_finetune_cli_writes_a_checkpoint_that_cbmir_evaluates_in_a_sweep(
    tiny_npz, tmp_path
) -> None:
    data = ["data=npz", f"data.path={tiny_npz}", "data.name=tiny", "data.size=28"]
    _run(
        "cbmir.finetune.cli",
        [
            *data,
            *TINY_MODEL,
            "finetune.objective=triplet",
            "finetune.max_epochs=2",
            "finetune.batch_size=16",
            "finetune.limit_train_batches=2",
            "finetune.lr=1e-3",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    (summary_file,) = (tmp_path / "logs" / "finetune").rglob("finetune.json")
    run_dir = summary_file.parent
    summary = json.loads(summary_file.read_text())
    best = run_dir / "best.ckpt"
    assert summary["best_checkpoint"] == str(best) and best.is_file()
    assert (run_dir / "last.ckpt").is_file()
    assert summary["splits_read"] == ["train", "val"] and summary["query_split_untouched"]
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert any(r.get("val/map@5") for r in rows) and any(r.get("train/loss_epoch") for r in rows)
    assert summary["evaluate_command"].startswith(f"cbmir model=finetuned model.checkpoint={best}")

    # the benchmark, next to a frozen model, in one Hydra multirun
    _run(
        "cbmir.cli",
        ["-m", "model=pixels,finetuned", f"+finetuned_checkpoint={best}", *data],
        tmp_path,
    )
    jobs = {}
    for metrics_file in (tmp_path / "logs" / "retrieval").rglob("metrics.json"):
        job = json.loads((metrics_file.parent / "job.json").read_text())
        jobs[job["run_name"]] = json.loads(metrics_file.read_text())
    assert sorted(jobs) == ["pixels-tiny-28", "test_resnet-triplet-full-tiny-28"]
    reported = jobs["test_resnet-triplet-full-tiny-28"]
    assert (reported["n_queries"], reported["n_database"]) == (40, 96)  # test queries, train db

    # its numbers are the checkpoint's: recomputed here from the loaded extractor
    dm = NpzDataModule(path=tiny_npz)
    ext = load_finetuned(best).freeze()
    expected = evaluate_retrieval(
        _embed(ext, dm, "test"),
        dm.labels("test"),
        _embed(ext, dm, "train"),
        dm.labels("train"),
        k=5,
    )
    for key in ("map@5", "acc@1", "acc@5", "mmv@5"):
        assert reported[key] == pytest.approx(expected[key], abs=1e-6), key

    # the base model's own checkpoint route loads the same fine-tuned backbone
    base = TimmExtractor(
        model_name="test_resnet",
        pretrained=False,
        input_size=None,
        pool="head",
        checkpoint=str(best),
    ).freeze()
    images = torch.from_numpy(dm.images("test")[:8].copy()).unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(base(images), ext.features(ext.preprocess(images)))
