"""Content checksums of data files, computed once per version of a file.

Hashing a multi-GB npz takes a minute, so its digests (sha256: cbmir's identity of the content;
md5: MedMNIST's published checksum) are cached in a small JSON file, keyed by the file's *stamp*:
real path, size, mtime_ns, ctime_ns, inode and device. `cp -p`, `rsync -a` and `os.utime` can
restore a size and an mtime, but not the ctime (the kernel sets it on every write, rename-in
and utime call, and nobody can set it back) nor the inode of a file copied into place. So a file
whose content changed never matches its old stamp and is hashed again; an untouched file is
never re-read. A chmod, a new hard link or a remount also changes the stamp: one extra hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbmir.errors import DataError
from cbmir.io_utils import file_version, write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_CHUNK = 4 * 2**20


@dataclass(frozen=True)
class Digests:
    """Checksums of one file version, and the stamp they belong to."""

    sha256: str
    md5: str
    stamp: dict[str, Any]


def hash_file(path: str | os.PathLike) -> dict[str, str]:
    """sha256 and md5 of a file in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def _cached(cache_file: Path, current: dict[str, Any]) -> dict[str, str] | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        record = json.loads(cache_file.read_text())
        if record["version"] == CACHE_VERSION and record["stamp"] == current:
            digests = record["digests"]
            if all(isinstance(digests.get(k), str) for k in ("sha256", "md5")):
                return digests
    return None


def file_digests(path: str | os.PathLike, cache_file: str | os.PathLike) -> Digests:
    """The checksums of `path`, from `cache_file` when its stamp is unchanged, else hashed (and
    cached). A file that changes while it is hashed is a DataError, not a wrong checksum."""
    path, cache_file = Path(path), Path(cache_file)
    before = file_version(path)
    digests = _cached(cache_file, before)
    if digests is not None:
        return Digests(digests["sha256"], digests["md5"], before)
    log.info("checksumming %s (once per version of the file)", path)
    digests = hash_file(path)
    if file_version(path) != before:
        raise DataError(f"{path} changed while it was being checksummed; run again.")
    try:
        write_json(cache_file, {"version": CACHE_VERSION, "stamp": before, "digests": digests})
    except OSError as exc:  # read-only folder: correct, only slower next time
        log.warning("cannot cache the checksums of %s in %s (%s)", path, cache_file, exc)
    return Digests(digests["sha256"], digests["md5"], before)
