"""A real fine-tune in-process (tiny timm CNN, tiny npz): checkpoints, exact resume after an
interruption, the query split never read, and the checkpoint reproducing its own val score."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from cbmir.data.datamodule import RetrievalDataModule
from cbmir.data.datasets import ArraySplitDataset
from cbmir.finetune.checkpoint import load_finetuned
from cbmir.finetune.run import run_finetune
from cbmir.retrieval import evaluate_retrieval


class SplitSpy:
    """Records every split a data module opens and every split an item is read from."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.items_read: set[str] = set()
        self._split_of: dict[int, str] = {}
        original_dataset = RetrievalDataModule.dataset
        original_getitem = ArraySplitDataset.__getitem__
        spy = self

        def dataset(module, split):
            spy.opened.append(split)
            ds = original_dataset(module, split)
            spy._split_of[id(ds)] = split
            return ds

        def getitem(ds, index):
            spy.items_read.add(spy._split_of.get(id(ds), "?"))
            return original_getitem(ds, index)

        monkeypatch.setattr(RetrievalDataModule, "dataset", dataset)
        monkeypatch.setattr(ArraySplitDataset, "__getitem__", getitem)


class Interrupt(L.Callback):
    """Simulates a crash (preemption, OOM) in the middle of an epoch."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated interruption")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(str(path), map_location="cpu", weights_only=True)["state_dict"]


def _seeded_start(cfg) -> dict[str, torch.Tensor]:
    """The backbone a fine-tune (and `cbmir` itself) builds from this seed: the frozen start."""
    from hydra.utils import instantiate

    L.seed_everything(cfg.seed, verbose=False)
    return instantiate(cfg.model).state_dict()


def test_interrupted_fine_tune_resumes_to_the_same_result_and_never_reads_the_query_split(
    finetune_cfg, monkeypatch, tmp_path
) -> None:
    spy = SplitSpy(monkeypatch)
    straight = run_finetune(finetune_cfg("finetune.max_epochs=2", out="straight"))
    run_dir = tmp_path / "straight"
    assert Path(straight["best_checkpoint"]) == run_dir / "best.ckpt"
    assert (run_dir / "last.ckpt").is_file() and (run_dir / "finetune.json").is_file()
    assert straight["epochs_done"] == 2 and straight["global_step"] == 6
    assert 0.0 <= straight["best_score"] <= 1.0

    cut_cfg = finetune_cfg("finetune.max_epochs=2", out="cut")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_finetune(cut_cfg, callbacks=[Interrupt(epoch=1, batch=1)])
    cut = tmp_path / "cut"
    saved = torch.load(str(cut / "last.ckpt"), map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 3)  # end of the first epoch

    resumed = run_finetune(
        finetune_cfg("finetune.max_epochs=2", f"finetune.resume={cut / 'last.ckpt'}", out="again")
    )
    assert resumed["resumed_from"] == str(cut / "last.ckpt")
    assert Path(resumed["best_checkpoint"]).parent == cut  # checkpoints continue in RUN_DIR
    assert resumed["global_step"] == straight["global_step"]
    assert resumed["best_score"] == pytest.approx(straight["best_score"], abs=1e-6)
    a, b = _weights(run_dir / "last.ckpt"), _weights(cut / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    start = _seeded_start(finetune_cfg())  # training moved the backbone away from its start
    assert any(not torch.equal(a[f"extractor.base.{k}"], v) for k, v in start.items())

    # the query (test) split: never opened, never read, in any of the three runs
    assert "test" not in spy.opened and "test" not in spy.items_read
    assert spy.items_read == {"train", "val"}
    for summary in (straight, resumed):
        assert summary["splits_read"] == ["train", "val"] and summary["query_split_untouched"]


def test_best_checkpoint_rebuilds_the_extractor_that_scored_best_on_val(
    finetune_cfg, tmp_path
) -> None:
    summary = run_finetune(
        finetune_cfg("finetune.strategy=projection_head", "finetune.projection_dim=16", out="ph")
    )
    best = Path(summary["best_checkpoint"])
    extractor = load_finetuned(best).freeze()
    assert extractor.output_dim() == 16 and extractor.head is not None
    assert extractor.identity()["weights"].startswith("sha256:")
    assert extractor.name == "test_resnet-supcon-projection_head"

    from cbmir.data import NpzDataModule

    dm = NpzDataModule(path=finetune_cfg().data.path)
    with torch.no_grad():
        emb = {
            s: extractor(torch.from_numpy(dm.images(s).copy()).unsqueeze(1)).numpy()
            for s in ("val", "train")
        }
    again = evaluate_retrieval(emb["val"], dm.labels("val"), emb["train"], dm.labels("train"), k=5)
    assert again["map@5"] == pytest.approx(summary["best_score"], abs=1e-5)
    # frozen backbone: the checkpoint's backbone is exactly the seeded random start
    assert summary["trainable_parameters"]["backbone_trainable"] == 0
    saved = _weights(best)
    for key, value in _seeded_start(finetune_cfg()).items():
        assert torch.equal(saved[f"extractor.base.{key}"], value), key
