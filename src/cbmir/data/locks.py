"""One writer per data file, and the leftovers of killed writers removed by the next one.

Every temporary that cbmir writes beside a data file `X` (a download `.X.<hex>.part`, an npz
being written `.X.<hex>.tmp`, a conversion directory `.X.tmp-<hex>`, a directory being replaced
`.X.old-<hex>`) is created only while holding an exclusive `fcntl.flock` on `.X.lock`. The OS
drops that lock when its holder exits, killed or not. So whoever holds the lock knows that every
temporary of `X` it finds belongs to a dead process: it may delete them, and a live writer's
files are never touched (their owner holds the lock). Lock files stay in place: deleting one
while another process waits on it would let two writers in.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cbmir.errors import DataError


class UnwritableFolderError(DataError):
    """The folder of a data file takes no new file (read-only), so no lock can be made there."""


log = logging.getLogger(__name__)

_TEMP_PATTERNS = (
    ".{name}.*.part",
    ".{name}.*.tmp",
    ".{name}.tmp-*",
    ".{name}.old-*",
    "{name}.part",
)


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file guarding `path` and its temporaries: `.{name}.lock` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def exclusive(path: str | os.PathLike, blocking: bool = True) -> Iterator[bool]:
    """Hold the lock of `path` for the block. Yields True when held; False when `blocking=False`
    and another live process holds it, or when the file system cannot lock (then nothing may
    be removed as stale: callers only remove temporaries when True)."""
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UnwritableFolderError(
            f"Cannot create the lock file {lock} ({exc}); cbmir writes data files only into "
            f"writable folders (set data.cache_dir for the converted arrays)."
        ) from None
    try:
        yield _flock(fd, lock, blocking)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _flock(fd: int, lock: Path, blocking: bool) -> bool:
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                return False
            log.info("waiting for another run that is writing %s", lock.name[1:-5])
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("%s: no file locking here (%s); concurrent runs are not serialised", lock, exc)
        return False
    return True


def temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporaries of `path` left in its folder (by live writers or dead ones)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found: set[Path] = set()
    for pattern in _TEMP_PATTERNS:
        found.update(path.parent.glob(pattern.format(name=glob.escape(path.name))))
    return sorted(found)


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of `path`. Only call this while holding `exclusive(path)`: then
    every one of them is a dead writer's. Returns what was removed."""
    removed = temporaries(path)
    for tmp in removed:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return removed


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove dead writers' temporaries of `path` if there are any and no live writer holds its
    lock; free (no lock file is created) when there is nothing to remove."""
    if not temporaries(path):
        return []
    try:
        with exclusive(path, blocking=False) as acquired:
            return remove_temporaries(path) if acquired else []
    except DataError:  # a read-only folder: whatever lies there is not ours to remove
        return []
