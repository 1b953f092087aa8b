"""Atomic file writes (a reader sees the old file or the whole new one, never half of it) and
locks that tell a live writer's temporaries from those a killed run left behind."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
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


def file_version(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies one version of a file without reading it: real path, size, mtime_ns,
    ctime_ns, inode and device.

    Size and mtime alone can be put back (`cp -p`, `rsync -a`, `os.utime`, `touch -d`), but the
    kernel sets ctime on every write, rename-in and utime call and no user call can set it back,
    and a file copied into place has a new inode. So a file whose content changed never keeps
    its version; a chmod, a new hard link or a remount also changes it (costing one re-check).
    The one version stamp of cbmir's caches and resume checks.
    """
    return {"path": os.path.realpath(path), **stat_version(os.stat(path))}


def stat_version(st: os.stat_result) -> dict[str, int]:
    """`file_version` but the path, from a `stat` result (links followed)."""
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


# --- ownership of temporaries and job directories -------------------------------------------
# A process that writes a temporary file or directory holds an exclusive `flock` on it for as
# long as it writes. The kernel drops the lock when the process dies (even by `kill -9`), so
# "no one holds the lock" is exactly "its writer is gone": the temporary is stale and can be
# removed, while a live writer's temporary is never touched. No pid, host or age is guessed.


def try_lock(path: str | Path, wait: bool = False) -> int | None:
    """An open fd holding an exclusive `flock` on `path` (a file or a directory), or None when
    another live process holds it (with `wait`, block until it is free) or `path` is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    if os.fstat(fd).st_nlink == 0:  # removed by a cleaner between our open and our lock
        os.close(fd)
        return None
    return fd


def release(fd: int | None) -> None:
    """Drop a lock taken with `try_lock` / `owned_tempdir` (closing the fd releases it)."""
    if fd is not None:
        os.close(fd)


def owned_tempdir(parent: str | Path, prefix: str) -> tuple[Path, int]:
    """`mkdtemp(prefix=prefix, dir=parent)` that this process holds locked: (path, fd).

    Keep the fd open while writing and `release` it after publishing or removing the directory;
    `remove_stale` leaves the directory alone until then.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:  # a cleaner may remove the new directory before we lock it: take another
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = try_lock(path)
        if fd is not None:
            return path, fd


def remove_stale(paths: Iterable[Path]) -> list[Path]:
    """Remove each temporary (file or directory) whose writer is gone; keep those of live
    processes. Returns what was removed."""
    removed = []
    for path in paths:
        fd = try_lock(path)
        if fd is None:
            continue
        try:  # remove while holding the lock, so no new owner can take it meanwhile
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            release(fd)
    return removed
