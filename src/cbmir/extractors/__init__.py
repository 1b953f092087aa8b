"""Frozen feature extractors behind one interface (`Extractor`) and a registry."""

from . import conch, medclip, open_clip_extractor, pixels, timm_extractor  # noqa: F401  (registers the families)
from .base import Extractor
from .registry import create, families, get_family, register

__all__ = ["Extractor", "create", "families", "get_family", "register"]
