"""A local Hugging Face hub cache in the layout `huggingface_hub` writes, for offline tests of
the pretrained path: `models--ORG--NAME/refs/main` (the commit), `blobs/<sha256>` (the file) and
`snapshots/<commit>/<filename>` (a relative symlink to the blob)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch


def repo_dir(hub_cache: Path, repo_id: str) -> Path:
    return hub_cache / ("models--" + repo_id.replace("/", "--"))


def add_file(
    hub_cache: Path, repo_id: str, filename: str, data: bytes, commit: str | None = None
) -> Path:
    """Put `data` into the cache as `filename` of `repo_id` at `commit` (refs/main points at
    it); returns the snapshot path (the symlink hub clients hand out)."""
    root = repo_dir(hub_cache, repo_id)
    commit = commit or hashlib.sha1(f"{repo_id}@main".encode()).hexdigest()
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    link = root / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().clone().contiguous() for k, v in state.items()})


def torch_bytes(state: dict[str, torch.Tensor], tmp: Path) -> bytes:
    torch.save({k: v.detach().clone().contiguous() for k, v in state.items()}, tmp)
    return tmp.read_bytes()


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache under `tmp_path`, offline, for this process and its subprocesses;
    cbmir's own cache (weights hashes, MedCLIP) under `tmp_path` too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CBMIR_CACHE", str(tmp_path / "cbmir-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
