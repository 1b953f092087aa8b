"""The identity of a weights file as it was loaded: what goes into the embedding-store key.

A repository name or a pretrained tag does not pin weights: a hub repository is updated, a
cached file is replaced or corrupted, `HF_HOME` points at another cache. So every weights
source keys the store by the file actually loaded: its size and sha256, plus where it came
from (hub repository and snapshot commit, URL, or the local path of a checkpoint).

Hashing a multi-GB file on every run costs what the store saves, so the sha256 is cached in
small JSON files under `<cache>/weights-sha256/` (`CBMIR_CACHE`, else `~/.cache/cbmir`), one
per file version. A version is its real path, device, inode, size, mtime *and ctime*: mtime
alone can be set back (`os.utime`, `touch -d`, `cp -p`, `rsync -a`), but the kernel stamps
ctime on every write, metadata change and new inode and no user call can set it, so a file
rewritten in place with its old size and mtime still gets a new version and is hashed again.
Small files are hashed directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cbmir.errors import CbmirError
from cbmir.io_utils import file_version, write_json

from .base import file_sha256

log = logging.getLogger(__name__)

#: files smaller than this are hashed every time (faster than a cache lookup matters)
CACHE_MIN_BYTES = 8 << 20
HASH_CACHE = "weights-sha256"


def cache_root() -> Path:
    """cbmir's own cache folder: `CBMIR_CACHE`, else `$XDG_CACHE_HOME/cbmir` (~/.cache/cbmir)."""
    base = os.environ.get("CBMIR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cbmir"
    )
    return Path(base).expanduser()


def _version(path: Path) -> dict[str, Any]:
    """What identifies one version of a file without reading it (see the module doc)."""
    version = file_version(path)
    _record(Path(path).absolute())  # as named: a re-pointed link is another input (`resume`)
    return version


#: the weights files identified while `recording` is open (one list per open context)
_RECORDERS: list[list[Path]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[Path]]:
    """Collects the paths (as named) of the weights files identified (hashed) inside the block, e.g.
    while an extractor is built: a job records them as its inputs, so that resuming it notices
    weights rewritten in place (`cbmir.resume`)."""
    files: list[Path] = []
    _RECORDERS.append(files)
    try:
        yield files
    finally:
        _RECORDERS.remove(files)


def _record(path: Path) -> None:
    for files in _RECORDERS:
        if path not in files:
            files.append(path)


def _cache_file(version: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(version, sort_keys=True).encode()).hexdigest()[:40]
    return cache_root() / HASH_CACHE / f"{digest}.json"


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, from the cache when this version of the file was hashed before."""
    path = Path(path).expanduser()
    version = _version(path)
    if version["size"] < CACHE_MIN_BYTES:
        return file_sha256(path)
    entry = _cache_file(version)
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(entry.read_text())
        if cached.get("version") == version and len(cached.get("sha256", "")) == 64:
            return str(cached["sha256"])
    digest, version = _stable_sha256(path, version)
    try:
        write_json(_cache_file(version), {"version": version, "sha256": digest})
    except OSError as exc:  # a read-only cache folder only costs a re-hash next time
        log.debug("could not cache the sha256 of %s: %s", path, exc)
    return digest


def _stable_sha256(
    path: Path, version: dict[str, Any], tries: int = 3
) -> tuple[str, dict[str, Any]]:
    """Hash `path` and the version hashed, checking that it did not change while read."""
    for _ in range(tries):
        digest = file_sha256(path)
        now = _version(path)
        if now == version:
            return digest, version
        version = now
    raise CbmirError(f"{path} keeps changing while it is read; wait until it is complete")


def file_identity(path: str | Path, **source: Any) -> dict[str, Any]:
    """`{**source, file, size, sha256}` of the weights file at `path`: a store-key part."""
    path = Path(path).expanduser()
    return {
        **source,
        "file": path.name,
        "size": path.resolve().stat().st_size,
        "sha256": sha256(path),
    }
