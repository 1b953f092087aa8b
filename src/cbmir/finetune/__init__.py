"""Fine-tuned extractors: train a backbone (and optional projection head) for retrieval on the
database split, select it by val mAP@k, and plug the checkpoint into the benchmark
(`cbmir model=finetuned model.checkpoint=RUN_DIR/best.ckpt`).

Entry point: `cbmir-finetune` (`cbmir.finetune.cli`); the job itself is `run.run_finetune`.
Exports resolve lazily, so that the entry point checks its input before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FineTunedExtractor": "cbmir.finetune.extractor",
    "ProjectionHead": "cbmir.finetune.extractor",
    "load_finetuned": "cbmir.finetune.checkpoint",
    "read_spec": "cbmir.finetune.checkpoint",
}
__all__ = ["FineTunedExtractor", "ProjectionHead", "load_finetuned", "read_spec"]

if TYPE_CHECKING:
    from cbmir.finetune.checkpoint import load_finetuned, read_spec
    from cbmir.finetune.extractor import FineTunedExtractor, ProjectionHead


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cbmir.finetune' has no attribute {name!r}")
