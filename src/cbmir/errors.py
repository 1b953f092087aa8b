"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class CbmirError(Exception):
    """Bad input or environment that the user can fix; the message says how."""


class ConfigError(CbmirError):
    """An invalid choice in the configuration (unknown dataset, model, size, ...)."""


class DataError(CbmirError):
    """A missing, corrupt or wrongly shaped data file."""


class EmbeddingError(CbmirError):
    """An extractor produced unusable embeddings (NaN/Inf, wrong shape)."""
