"""cbmir: content-based medical image retrieval benchmark."""

__version__ = "0.1.0"
