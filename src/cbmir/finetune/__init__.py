"""Fine-tuned extractors: train a backbone (and optional projection head) for retrieval on the
database split, select it by val mAP@k, and plug the checkpoint into the benchmark
(`cbmir model=finetuned model.checkpoint=RUN_DIR/best.ckpt`).

Entry point: `cbmir-finetune` (`cbmir.finetune.cli`); the job itself is `run.run_finetune`.
"""

from .checkpoint import load_finetuned, read_spec
from .extractor import FineTunedExtractor, ProjectionHead

__all__ = ["FineTunedExtractor", "ProjectionHead", "load_finetuned", "read_spec"]
