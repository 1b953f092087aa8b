"""The fine-tuning LightningModule: train an extractor for retrieval, select it by retrieval.

Validation is the benchmark's own protocol on held-in data: the val split's images are queries,
the train split is the database, and `cbmir.retrieval.evaluate_retrieval` scores the k nearest
neighbours (map@k, acc@1/3/5, mmv@k) with the benchmark's distance. `val/map@k` picks the
checkpoint. The test split never enters (see `cbmir.finetune.data`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from cbmir.errors import EmbeddingError
from cbmir.retrieval import evaluate_retrieval

from .augment import AffineAugment
from .checkpoint import CKPT_KEY
from .extractor import FineTunedExtractor
from .losses import make_objective
from .strategy import apply_strategy, count_parameters

QUERY, DATABASE = 0, 1


class RetrievalFineTuner(L.LightningModule):
    """Holds the extractor (what is kept), the objective (discarded) and the val retrieval."""

    def __init__(
        self,
        extractor: FineTunedExtractor,
        spec: dict[str, Any],
        *,
        objective: str,
        strategy: str,
        image_shape: tuple[int, ...],
        num_classes: int,
        multilabel: bool = False,
        lr: float = 1e-4,
        head_lr: float | None = None,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.0,
        temperature: float = 0.1,
        margin: float = 0.2,
        mining: str = "semihard",
        augment: dict[str, Any] | None = None,
        k: int = 5,
        distance: str = "euclidean",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["extractor", "spec"])
        self.extractor = extractor
        self.spec = spec
        self.objective = make_objective(
            objective,
            dim=extractor.output_dim(tuple(image_shape)),
            num_classes=num_classes,
            multilabel=multilabel,
            normalized=extractor.normalize,
            temperature=temperature,
            margin=margin,
            mining=mining,
        )
        self._frozen = apply_strategy(extractor, strategy, tuple(image_shape))
        self.augment = AffineAugment(**augment) if augment else None
        self._val: dict[int, list[tuple[torch.Tensor, ...]]] = {QUERY: [], DATABASE: []}
        self.val_metrics: dict[str, float] = {}

    # -- parameters ------------------------------------------------------------------------
    def trainable_summary(self) -> dict[str, int]:
        base = self.extractor.base
        return {
            "backbone_trainable": count_parameters(p for p in base.parameters() if p.requires_grad),
            "backbone_total": count_parameters(base.parameters()),
            "head": count_parameters(self.extractor.head.parameters())
            if self.extractor.head is not None
            else 0,
            "objective": count_parameters(self.objective.parameters()),
        }

    def train(self, mode: bool = True) -> RetrievalFineTuner:
        """Frozen parts (a frozen backbone, frozen norm layers) stay in eval mode."""
        super().train(mode)
        if mode:
            self._freeze_modes()
        return self

    def _freeze_modes(self) -> None:
        for module in self._frozen:
            module.eval()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores per-module modes after validation without calling train():
        # re-assert eval mode on frozen parts so their BatchNorm statistics never move
        self._freeze_modes()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        backbone = [p for p in self.extractor.base.parameters() if p.requires_grad]
        in_backbone = {id(p) for p in backbone}
        heads = [
            p for p in self.extractor.parameters() if p.requires_grad and id(p) not in in_backbone
        ]
        heads += [p for p in self.objective.parameters() if p.requires_grad]
        groups = [
            {"params": g, "lr": lr}
            for g, lr in ((backbone, hp.lr), (heads, hp.head_lr or hp.lr))
            if g
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, int(self.trainer.max_epochs or 1))
        warmup = min(total - 1, int(round(hp.warmup_epochs * total / epochs)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _warmup_cosine(step, warmup, total)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = self.extractor.preprocess(batch["image"])
        if self.augment is not None:
            x = self.augment(x, seed=self.hparams.seed * 1_000_003 + self.global_step)
        if self.hparams.strategy == "projection_head":
            with torch.no_grad():
                feats = self.extractor.features(x)
            emb = self.extractor.project(feats.float())
        else:
            emb = self.extractor.embed(x)
        loss = self.objective(emb, batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    # -- validation: val queries against the train database --------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {QUERY: [], DATABASE: []}

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        emb = self.extractor(batch["image"]).float()
        self._val[dataloader_idx].append(
            (batch["index"].detach().cpu(), emb.detach().cpu(), batch["label"].detach().cpu())
        )

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        loaders = self.trainer.val_dataloaders
        q_emb, q_lab = _gather(self._val[QUERY], len(loaders[QUERY].dataset), "val queries")
        db_emb, db_lab = _gather(self._val[DATABASE], len(loaders[DATABASE].dataset), "database")
        result = evaluate_retrieval(
            q_emb, q_lab, db_emb, db_lab, k=self.hparams.k, distance=self.hparams.distance
        )
        metrics = {f"val/{name}": float(v) for name, v in result.items() if "@" in name}
        self.val_metrics = metrics
        monitor = monitor_key(self.hparams.k)
        self.log_dict({k: v for k, v in metrics.items() if k != monitor}, prog_bar=False)
        self.log(monitor, metrics[monitor], prog_bar=True)
        self._val = {QUERY: [], DATABASE: []}

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = self.spec


def monitor_key(k: int) -> str:
    """The model-selection metric: the benchmark's mAP@k on val queries."""
    return f"val/map@{int(k)}"


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _gather(parts: list[tuple[torch.Tensor, ...]], n: int, what: str) -> tuple[torch.Tensor, ...]:
    """Rows back in dataset order; every row must be there (no partial val passes)."""
    if not parts:
        raise EmbeddingError(f"validation produced no {what} embeddings")
    index, emb, labels = (torch.cat(column) for column in zip(*parts, strict=True))
    if len(index) != n or len(torch.unique(index)) != n:
        raise EmbeddingError(
            f"validation saw {len(index)} of {n} {what} rows: retrieval metrics need the whole "
            "split (do not set trainer.limit_val_batches)"
        )
    order = torch.argsort(index)
    return emb[order], labels[order]
