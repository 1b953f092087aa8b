"""Frozen feature extractors behind one interface (`Extractor`); the model configs
(`configs/model/*.yaml`) name each one's class through `_target_`."""

from .base import Extractor

__all__ = ["Extractor"]
