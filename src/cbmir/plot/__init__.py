"""Figures of stored embeddings: `cbmir-plot embeddings RUN_DIR` (see docs/query.md)."""
