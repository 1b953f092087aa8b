"""Registry of extractor families, so new sources plug in without touching the pipeline.

Hydra configs name a class through `_target_`; the registry is the Python-side catalogue
(`cbmir.extractors.create("timm", model_name="resnet50.tv_in1k")`) and the list of valid
choices printed in error messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from cbmir.errors import ConfigError

from .base import Extractor

E = TypeVar("E", bound=type[Extractor])

_FAMILIES: dict[str, type[Extractor]] = {}


def register(family: str) -> Callable[[E], E]:
    """Class decorator: make an extractor family available by name."""

    def decorate(cls: E) -> E:
        if family in _FAMILIES and _FAMILIES[family] is not cls:
            raise ValueError(f"extractor family {family!r} registered twice")
        _FAMILIES[family] = cls
        return cls

    return decorate


def families() -> list[str]:
    return sorted(_FAMILIES)


def get_family(family: str) -> type[Extractor]:
    try:
        return _FAMILIES[family]
    except KeyError:
        raise ConfigError(
            f"unknown extractor family {family!r}; valid: {', '.join(families())}"
        ) from None


def create(family: str, **kwargs: Any) -> Extractor:
    """Build an extractor of a registered family."""
    return get_family(family)(**kwargs)
