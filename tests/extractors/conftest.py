"""Fixtures of the extractor tests: a local Hugging Face hub cache (tests/hub_cache.py)."""

from tests.hub_cache import hub_cache  # noqa: F401
