"""A fine-tuned extractor: a base extractor's backbone, an optional projection head, an optional
L2 normalisation. It is an `Extractor` like any other, so the benchmark embeds with it unchanged.

The base keeps its own preprocessing (resize, mean/std): fine-tuning changes weights, never how
images are fed, so the frozen and fine-tuned runs of a backbone see identical inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbmir.extractors.base import Extractor

#: identity keys of the base that describe its weights, not its architecture or preprocessing
#: (`init`, `seed`, `built_with`, `backend`: how random weights were drawn, see
#: `cbmir.extractors.random_init`)
WEIGHT_KEYS = ("weights", "pretrained", "checkpoint", "init", "seed", "built_with", "backend")


class ProjectionHead(nn.Module):
    """[BatchNorm] -> Linear -> ReLU -> Linear: a small trainable map on top of the backbone.

    `input_norm` standardises the backbone features first (BatchNorm without affine, as in
    linear probing): frozen features are often nearly collinear (a random-init ResNet18 on
    digits: mean pairwise cosine 0.996), and a head fed them raw barely learns.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int | None = None, input_norm: bool = True
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.hidden_dim = int(hidden_dim or in_dim)
        self.input_norm = bool(input_norm)
        layers: list[nn.Module] = [nn.BatchNorm1d(self.in_dim, affine=False)] if input_norm else []
        layers += [
            nn.Linear(self.in_dim, self.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(self.hidden_dim, self.out_dim),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def spec(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "hidden_dim": self.hidden_dim,
            "out_dim": self.out_dim,
            "input_norm": self.input_norm,
        }


class FineTunedExtractor(Extractor):
    """`embed(x) = normalize?(head?(base.embed(x)))`, with the base's own preprocessing.

    `weights` names where the weights came from (`sha256:...` of the checkpoint file once
    loaded); it goes into `identity()` and so into the embedding-store key.
    """

    def __init__(
        self,
        base: Extractor,
        head: ProjectionHead | None = None,
        normalize: bool = False,
        name: str | None = None,
        weights: str = "untrained",
    ) -> None:
        super().__init__(
            input_size=base.input_size,
            min_size=base.min_size,
            mean=None,
            std=None,
            interpolation=base.interpolation,
        )
        self.base = base
        self.head = head
        self.normalize = bool(normalize)
        self.name = name or f"{base.name}-finetuned"
        self.in_chans = base.in_chans
        self.weights = weights

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.preprocess(images)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (before the head)."""
        return self.base.embed(x)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone features -> embedding (head, then normalisation)."""
        out = self.head(feats) if self.head is not None else feats
        return F.normalize(out, dim=1) if self.normalize else out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x))

    def output_dim(self, image_shape: tuple[int, ...] | None = None) -> int:
        if self.head is not None:
            return self.head.out_dim
        return self.base.output_dim(image_shape)

    def head_spec(self) -> dict[str, Any] | None:
        return self.head.spec() if self.head is not None else None

    def identity(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "name": self.name,
            "base": architecture_identity(self.base),
            "head": self.head_spec(),
            "normalize": self.normalize,
            "weights": self.weights,
        }


def architecture_identity(extractor: Extractor) -> dict[str, Any]:
    """The base's identity without its weight source: what must match when it is rebuilt."""
    return {k: v for k, v in extractor.identity().items() if k not in WEIGHT_KEYS}
