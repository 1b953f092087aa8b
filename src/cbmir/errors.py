"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""

import http.client

#: what a failed download raises in the libraries cbmir downloads with (urllib and
#: torch.hub: OSError, HTTPException, ValueError for a bad URL; torchvision and open_clip:
#: RuntimeError for a checksum mismatch). Anything else is a bug and keeps its traceback.
DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, http.client.HTTPException)


class CbmirError(Exception):
    """Bad input or environment that the user can fix; the message says how."""


class ConfigError(CbmirError):
    """An invalid choice in the configuration (unknown dataset, model, size, ...)."""


class DataError(CbmirError):
    """A missing, corrupt or wrongly shaped data file."""


class EmbeddingError(CbmirError):
    """An extractor produced unusable embeddings (NaN/Inf, wrong shape)."""
