"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def _atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return _atomic(path, lambda h: h.write(text.encode()))


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    return _atomic(path, lambda h: np.savez(h, **arrays))


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda h: h.write(text.encode()))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic(path, lambda h: h.write(data))
