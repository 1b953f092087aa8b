"""The pretrained path as a user runs it: a local Hugging Face hub cache holding weights in the
real repositories' file names, `HF_HUB_OFFLINE=1`, the default `pretrained=true`.

- the store key holds the identity of the file loaded (snapshot commit, size, sha256): weights
  replaced in the cache, even in place with the old size and mtime, are embedded again;
- a broken cached file (truncated, another architecture, missing) is one clear error that names
  the file and how to drop it from the cache, never a hint about the network;
- each weights source gives the embeddings of the upstream library's own loading path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from tests.helpers import run_cbmir
from tests.hub_cache import add_file, safetensors_bytes, torch_bytes

from cbmir.extractors import weights_file
from cbmir.extractors.checkpoint import CheckpointError, UnreadableWeightsError
from cbmir.extractors.hub import HubError
from cbmir.extractors.timm_extractor import TimmExtractor

RESNET_REPO = "timm/resnet18.tv_in1k"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGES = torch.randint(
    0, 256, (4, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
)


def resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random resnet18 weights with the ImageNet head, as on the hub. Without
    timm's zero-init of the last BN scale, so the embedding depends on the whole image."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, zero_init_last=False)
    return model.state_dict()


def _jobs(logs: Path) -> list[Path]:
    return sorted((p.parent for p in logs.rglob("metrics.json")), key=lambda p: p.stat().st_mtime)


def _stored(store: Path, split: str) -> tuple[np.ndarray, dict]:
    for manifest_path in store.glob("*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        if manifest["data"]["split"] == split:
            return np.load(manifest_path.parent / "embeddings.npy"), manifest
    raise AssertionError(f"no {split} entry in {store}")


# -- item 1: the store key follows the weights file -----------------------------------------
def test_hub_weights_rewritten_in_place_are_embedded_again(hub_cache, tmp_path) -> None:
    link = add_file(
        hub_cache, RESNET_REPO, "model.safetensors", safetensors_bytes(resnet18_state(0))
    )
    # one job directory with resume on: the re-run must not be skipped as "finished" either
    job_dir = tmp_path / "logs" / "job"
    args = ["data.synthetic=true", "model=resnet18", "resume=true", f"hydra.run.dir={job_dir}"]
    first = run_cbmir(args, tmp_path)
    assert "test=embed" in first.stderr + first.stdout
    (job1,) = _jobs(tmp_path / "logs")
    metrics1 = json.loads((job1 / "metrics.json").read_text())
    _, manifest = _stored(tmp_path / "store", "test")
    weights = manifest["extractor"]["weights"]
    blob = link.resolve()
    assert weights["repo"] == RESNET_REPO and weights["file"] == "model.safetensors"
    assert weights["revision"] == link.parent.name and weights["size"] == blob.stat().st_size
    assert weights["sha256"] == blob.name  # the hub names blobs by their sha256
    _assert_stored_match_timm(tmp_path)

    # other weights written into the same file: same path, inode, size and mtime
    before = blob.stat()
    other = safetensors_bytes(resnet18_state(1))
    assert len(other) == before.st_size
    with open(blob, "r+b") as handle:
        handle.write(other)
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = blob.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )

    second = run_cbmir(args, tmp_path)
    log = second.stderr + second.stdout
    assert "test=embed" in log and "train=embed" in log, log
    job2 = _jobs(tmp_path / "logs")[-1]
    metrics2 = json.loads((job2 / "metrics.json").read_text())
    assert sorted(metrics2["embedded_now"]) == ["test", "train"]
    assert metrics2["map@5"] != metrics1["map@5"] or metrics2["acc@1"] != metrics1["acc@1"]
    assert len(list((tmp_path / "store").glob("*/manifest.json"))) == 4


def _assert_stored_match_timm(root: Path) -> None:
    """Stored test embeddings == timm's own loading of the tag from the same cache, fed the
    paper's CNN input (28 px upsized to 32, bilinear, ImageNet statistics)."""
    stored, _ = _stored(root / "store", "test")
    (npz,) = (root / "synthetic").rglob("breastmnist*.npz")
    pixels = torch.from_numpy(np.load(npz)["test_images"]).float().div(255)[:, None]
    x = torch.nn.functional.interpolate(
        pixels.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear"
    )
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    model = timm.create_model("resnet18.tv_in1k", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        reference = model(x).numpy()
    rel = np.linalg.norm(stored - reference) / np.linalg.norm(reference)
    assert rel <= 1e-4, rel
    dist = ((stored[:, None] - stored[None]) ** 2).sum(-1)
    ref_dist = ((reference[:, None] - reference[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(
        np.argsort(dist, axis=1, kind="stable")[:, :6],
        np.argsort(ref_dist, axis=1, kind="stable")[:, :6],
    )


def test_sha256_cache_is_not_fooled_by_a_restored_mtime(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CBMIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights_file, "CACHE_MIN_BYTES", 0)
    hashed = []
    real = weights_file.file_sha256
    monkeypatch.setattr(weights_file, "file_sha256", lambda p: hashed.append(p) or real(p))
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    first = weights_file.sha256(path)
    assert weights_file.sha256(path) == first and len(hashed) == 1  # cached
    st = path.stat()
    with open(path, "r+b") as handle:
        handle.write(b"b" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    second = weights_file.sha256(path)
    assert second != first and len(hashed) == 2
    assert weights_file.sha256(path) == second and len(hashed) == 2


# -- item 2: broken cache files --------------------------------------------------------------
def _assert_cache_error(message: str, path: Path) -> None:
    assert str(path) in message and f"rm {path}" in message, message
    assert "network" not in message.split("rm ")[0], message  # not the wrong way first
    assert "Traceback" not in message


def test_truncated_cached_timm_weights_name_the_file_and_how_to_remove_it(hub_cache) -> None:
    data = safetensors_bytes(resnet18_state(0))
    link = add_file(hub_cache, RESNET_REPO, "model.safetensors", data[: len(data) // 2])
    with pytest.raises(UnreadableWeightsError) as info:
        TimmExtractor(model_name="resnet18.tv_in1k")
    _assert_cache_error(str(info.value), link)
    assert str(link.resolve()) in str(info.value)  # the blob too


def test_cached_weights_of_another_architecture_name_the_file(hub_cache) -> None:
    torch.manual_seed(0)
    other = timm.create_model("resnet10t", pretrained=False).state_dict()
    link = add_file(hub_cache, RESNET_REPO, "model.safetensors", safetensors_bytes(other))
    with pytest.raises(CheckpointError) as info:
        TimmExtractor(model_name="resnet18.tv_in1k")
    _assert_cache_error(str(info.value), link)


def test_truncated_cached_hub_repo_weights_name_the_file(hub_cache, tmp_path) -> None:
    torch.manual_seed(0)
    data = torch_bytes(timm.create_model("resnet10t").state_dict(), tmp_path / "w.bin")
    link = add_file(hub_cache, "SomeLab/model", "pytorch_model.bin", data[:1000])
    with pytest.raises(UnreadableWeightsError) as info:
        TimmExtractor(model_name="resnet10t", hf_hub_id="SomeLab/model")
    _assert_cache_error(str(info.value), link)


def test_broken_cache_through_the_cli_is_one_message_without_traceback(hub_cache, tmp_path):
    data = safetensors_bytes(resnet18_state(0))
    link = add_file(hub_cache, RESNET_REPO, "model.safetensors", data[:4096])
    proc = run_cbmir(["data.synthetic=true", "model=resnet18"], tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and f"rm {link}" in out


def test_missing_cached_file_is_a_hub_error(hub_cache) -> None:
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set and none of model.safetensors"):
        TimmExtractor(model_name="resnet18.tv_in1k")
