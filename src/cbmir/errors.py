"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""

import http.client

#: what a failed download raises in the libraries cbmir downloads with (urllib and
#: torch.hub: OSError, HTTPException, ValueError for a bad URL; torchvision and open_clip:
#: RuntimeError for a checksum mismatch). Anything else is a bug and keeps its traceback.
DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, http.client.HTTPException)


def reason(exc: BaseException) -> str:
    """`Type: first line` of a library's exception (200 characters at most; `Type` alone when
    it says nothing), to name it in a one-line message without its traceback. Torch's
    weights_only unpickler says what it refused after advice that would mislead here."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


class CbmirError(Exception):
    """Bad input or environment that the user can fix; the message says how."""


class ConfigError(CbmirError):
    """An invalid choice in the configuration (unknown dataset, model, size, ...)."""


class DataError(CbmirError):
    """A missing, corrupt or wrongly shaped data file."""


class EmbeddingError(CbmirError):
    """An extractor produced unusable embeddings (NaN/Inf, wrong shape)."""
