"""Training objectives: embeddings + labels -> a scalar loss.

- `supcon`: supervised contrastive loss (Khosla et al. 2020) over the batch;
- `triplet`: triplet margin loss on semi-hard triplets mined in the batch;
- `classification`: a linear classifier on the embedding (cross-entropy; one-vs-rest BCE for
  multi-label sets), discarded after training: only the extractor is kept.

The metric-learning losses come from pytorch-metric-learning (the `finetune` extra). They
compare labels for equality, so they need one label per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cbmir.config import check_choice
from cbmir.errors import ConfigError

from .settings import METRIC_OBJECTIVES, OBJECTIVES

#: logits scale for a classifier on L2-normalised embeddings (NormFace / cosine softmax)
NORMALIZED_LOGIT_SCALE = 16.0


def _pml():
    try:
        import pytorch_metric_learning.losses as losses
        import pytorch_metric_learning.miners as miners
    except ImportError as exc:  # pragma: no cover - installed with the `finetune` extra
        raise ConfigError(
            "the supcon / triplet objectives need pytorch-metric-learning: "
            "pip install 'cbmir[finetune]' (or use finetune.objective=classification)"
        ) from exc
    return losses, miners


class SupConObjective(nn.Module):
    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        losses, _ = _pml()
        self.loss = losses.SupConLoss(temperature=temperature)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings.float(), labels[:, 0])


class TripletObjective(nn.Module):
    def __init__(self, margin: float = 0.2, mining: str = "semihard") -> None:
        super().__init__()
        losses, miners = _pml()
        self.loss = losses.TripletMarginLoss(margin=margin)
        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=mining)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb, y = embeddings.float(), labels[:, 0]
        return self.loss(emb, y, self.miner(emb, y))


class ClassificationObjective(nn.Module):
    def __init__(
        self, dim: int, num_classes: int, multilabel: bool = False, normalized: bool = False
    ) -> None:
        super().__init__()
        self.classifier = nn.Linear(dim, num_classes)
        self.multilabel = multilabel
        self.scale = NORMALIZED_LOGIT_SCALE if normalized else 1.0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(embeddings.float()) * self.scale
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels[:, 0])


def make_objective(
    name: str,
    *,
    dim: int,
    num_classes: int,
    multilabel: bool,
    normalized: bool,
    temperature: float = 0.1,
    margin: float = 0.2,
    mining: str = "semihard",
) -> nn.Module:
    """Build the objective; ConfigError for combinations that cannot work."""
    check_choice(name, OBJECTIVES, "finetune.objective")
    if name in METRIC_OBJECTIVES and multilabel:
        raise ConfigError(
            f"finetune.objective={name} needs one label per image; this data set is multi-label. "
            "Use finetune.objective=classification (one-vs-rest)."
        )
    if name == "supcon":
        return SupConObjective(temperature)
    if name == "triplet":
        return TripletObjective(margin, mining)
    return ClassificationObjective(dim, num_classes, multilabel, normalized)
