"""`model.checkpoint`: weights from a local file (state dict, safetensors, Lightning checkpoint
with a prefix), no network; identical embeddings after a round trip; a new file changes the
embedding-store identity; mismatched keys list what did not fit."""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file
from tests.hub_cache import add_file, safetensors_bytes, torch_bytes
from tests.swin_names import hf_swin_names
from tests.tiny_models import TINY_CONCH, TINY_OPEN_CLIP

from cbmir.extractors.checkpoint import (
    CheckpointError,
    UntrustedCheckpointError,
    load_into,
    read_state_dict,
    strip_prefix,
)
from cbmir.extractors.conch import ConchExtractor
from cbmir.extractors.medclip import MedClipExtractor
from cbmir.extractors.open_clip_extractor import OpenClipExtractor
from cbmir.extractors.timm_extractor import TimmExtractor

IMAGES = torch.randint(
    0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
)


def _timm(**kw):
    return TimmExtractor(
        model_name="vit_tiny_patch16_224",
        pool="cls",
        input_size=32,
        resize_mode="shortest",
        model_kwargs={"img_size": 32},
        **kw,
    ).freeze()


def _open_clip(config_path, **kw):
    return OpenClipExtractor(model_name="tiny-clip", model_config=str(config_path), **kw).freeze()


def _conch(**kw):
    return ConchExtractor(architecture=TINY_CONCH, input_size=32, **kw).freeze()


@pytest.fixture
def tiny_clip_config(tmp_path):
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    return path


def _embed(extractor) -> torch.Tensor:
    with torch.no_grad():
        return extractor(IMAGES)


def _save(state: dict, path, fmt: str):
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "lightning":  # what Trainer.save_checkpoint writes for a FrozenEmbedder
        torch.save(
            {
                "epoch": 0,
                "global_step": 0,
                "pytorch-lightning_version": "2.6.0",
                "state_dict": {f"extractor.{k}": v for k, v in state.items()},
                "hyper_parameters": {"lr": 1e-4},
            },
            path,
        )
    elif fmt == "backbone":  # a fine-tuning module that names it `backbone.` and has a head
        torch.save(
            {
                "state_dict": {
                    **{f"backbone.{k}": v for k, v in state.items()},
                    "head.weight": torch.zeros(3, 3),
                }
            },
            path,
        )
    else:
        torch.save(state, path)
    return path


SUFFIX = {
    "state_dict": ".pt",
    "safetensors": ".safetensors",
    "lightning": ".ckpt",
    "backbone": ".pth",
}


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "lightning", "backbone"])
def test_timm_checkpoint_round_trip(fmt: str, tmp_path) -> None:
    torch.manual_seed(1)
    source = _timm(pretrained=False)
    state = source.model.state_dict() if fmt == "state_dict" else source.state_dict()
    if fmt == "safetensors":
        state = source.model.state_dict()
    path = _save(state, tmp_path / f"w{SUFFIX[fmt]}", fmt)
    torch.manual_seed(2)
    loaded = _timm(checkpoint=str(path))
    torch.testing.assert_close(_embed(loaded), _embed(source), rtol=0, atol=0)
    assert loaded.identity() != source.identity()
    assert loaded.identity()["weights"].startswith("sha256:")


def test_a_new_checkpoint_file_changes_the_identity(tmp_path) -> None:
    # two random draws (the seed picks them; the global generator no longer does)
    a = _save(_timm(pretrained=False, seed=3).model.state_dict(), tmp_path / "a.pt", "state_dict")
    b = _save(_timm(pretrained=False, seed=4).model.state_dict(), tmp_path / "b.pt", "state_dict")
    ident_a = _timm(checkpoint=str(a)).identity()
    assert ident_a != _timm(checkpoint=str(b)).identity()
    assert ident_a == _timm(checkpoint=str(a)).identity()


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "lightning"])
def test_open_clip_checkpoint_round_trip_from_full_clip_state(
    fmt: str, tmp_path, tiny_clip_config
) -> None:
    torch.manual_seed(4)
    source = _open_clip(tiny_clip_config, pretrained=False)
    # a full CLIP state dict: image tower under visual.*, plus a text tower and logit scale
    state = {f"visual.{k}": v for k, v in source.model.visual.state_dict().items()}
    state["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(96, 32)
    state["logit_scale"] = torch.tensor(4.6)
    if fmt == "lightning":
        state = {f"model.{k}": v for k, v in source.model.state_dict().items()}
    path = _save(state, tmp_path / f"clip{SUFFIX[fmt]}", fmt)
    loaded = _open_clip(tiny_clip_config, checkpoint=str(path))
    torch.testing.assert_close(_embed(loaded), _embed(source), rtol=0, atol=0)
    assert loaded.identity()["weights"].startswith("sha256:")
    assert loaded.output_dim() == 32


def test_conch_checkpoint_round_trip_skips_text_and_caption_pooler(tmp_path) -> None:
    torch.manual_seed(5)
    source = _conch(pretrained=False)
    state = {f"visual.{k}": v for k, v in source.visual.state_dict().items()}
    state["visual.attn_pool_caption.query"] = torch.zeros(4, 32)
    state["visual.proj_contrast"] = torch.zeros(32, 32)
    state["text.token_embedding.weight"] = torch.zeros(10, 32)
    path = _save(state, tmp_path / "pytorch_model.bin", "state_dict")
    loaded = _conch(checkpoint=str(path))
    out = _embed(loaded)
    torch.testing.assert_close(out, _embed(source), rtol=0, atol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))  # normalize=True


def test_medclip_loads_hugging_face_swin_names(tmp_path) -> None:
    """MedCLIP's file uses transformers' Swin names; they map onto the timm network."""
    torch.manual_seed(6)
    source = MedClipExtractor(pretrained=False).freeze()
    hf = hf_swin_names(source.vision_model.model.state_dict())
    state = {f"vision_model.model.{k}": v for k, v in hf.items()}
    state["vision_model.projection_head.weight"] = source.vision_model.projection_head.weight
    state["text_model.projection_head.weight"] = torch.zeros(512, 768)
    state["logit_scale"] = torch.tensor(3.0)
    path = _save(state, tmp_path / "pytorch_model.bin", "state_dict")
    loaded = MedClipExtractor(checkpoint=str(path)).freeze()
    torch.testing.assert_close(_embed(loaded), _embed(source), rtol=0, atol=0)


def test_mismatched_keys_list_what_did_not_fit(tmp_path) -> None:
    torch.manual_seed(7)
    other = TimmExtractor(model_name="resnet18", pretrained=False)
    path = _save(other.model.state_dict(), tmp_path / "resnet.pt", "state_dict")
    with pytest.raises(CheckpointError) as info:
        _timm(checkpoint=str(path))
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "blocks.0.attn.qkv.weight" in message or "cls_token" in message
    assert "conv1.weight" in message


def test_shape_mismatch_is_reported(tmp_path) -> None:
    state = _timm(pretrained=False).model.state_dict()
    state["cls_token"] = torch.zeros(1, 1, 7)
    path = _save(state, tmp_path / "bad.safetensors", "safetensors")
    with pytest.raises(CheckpointError, match=r"another shape[\s\S]*cls_token"):
        _timm(checkpoint=str(path))


def test_missing_or_unreadable_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        _timm(checkpoint=str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        read_state_dict(junk)


def test_strip_prefix_picks_the_best_matching_prefix() -> None:
    t = torch.zeros(1)
    sd = {"extractor.model.a.weight": t, "extractor.model.b.bias": t, "extractor.head.weight": t}
    out, prefix = strip_prefix(sd, {"a.weight", "b.bias"})
    assert prefix == "extractor.model." and set(out) == {"a.weight", "b.bias"}
    out, prefix = strip_prefix({"a.weight": t}, {"a.weight"})
    assert prefix == "" and set(out) == {"a.weight"}


# -- the hub routes, offline: a real local hub cache, the loading is real ---------------------
# (these tests used to fake `hub.download` and assert the old store identity, the repository or
# tag name alone; the identity is now the file loaded: repository, snapshot commit, size, sha256)
def _hub_identity(link) -> dict:
    blob = link.resolve()
    return {
        "source": "hf-hub",
        "repo": "/".join(link.parents[2].name[len("models--") :].split("--")),
        "revision": link.parent.name,
        "file": link.name,
        "size": blob.stat().st_size,
        "sha256": blob.name,
    }


def test_timm_tag_weights_load_through_timm(hub_cache) -> None:
    torch.manual_seed(8)
    source = TimmExtractor(model_name="resnet18", pretrained=False, pool="avg")
    state = dict(source.model.state_dict())
    state["fc.weight"], state["fc.bias"] = (
        torch.zeros(1000, 512),
        torch.zeros(1000),
    )  # as on the hub
    link = add_file(
        hub_cache, "timm/resnet18.tv_in1k", "model.safetensors", safetensors_bytes(state)
    )
    loaded = TimmExtractor(model_name="resnet18.tv_in1k", pretrained=True, pool="avg").freeze()
    assert loaded.identity()["weights"] == {"timm_tag": "resnet18.tv_in1k", **_hub_identity(link)}
    torch.testing.assert_close(_embed(loaded), _embed(source.freeze()), rtol=0, atol=0)


def test_gated_hub_repo_weights_load_into_the_offline_architecture(hub_cache, tmp_path) -> None:
    torch.manual_seed(9)
    source = _timm(pretrained=False)
    data = torch_bytes(source.model.state_dict(), tmp_path / "w.bin")
    link = add_file(hub_cache, "SomeLab/some-gated-model", "pytorch_model.bin", data)
    loaded = _timm(pretrained=True, hf_hub_id="SomeLab/some-gated-model", gated=True)
    assert loaded.identity()["weights"] == _hub_identity(link)
    torch.testing.assert_close(_embed(loaded), _embed(source), rtol=0, atol=0)


def test_open_clip_tag_weights_read_only_the_image_tower(hub_cache) -> None:
    torch.manual_seed(10)
    source = OpenClipExtractor(
        model_name="ViT-B-32", weights="laion2b_s34b_b79k", pretrained=False
    ).freeze()
    state = {f"visual.{k}": v for k, v in source.model.visual.state_dict().items()}
    state["token_embedding.weight"] = torch.zeros(10, 512)
    link = add_file(
        hub_cache,
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        "open_clip_model.safetensors",
        safetensors_bytes(state),
    )
    loaded = OpenClipExtractor(model_name="ViT-B-32", weights="laion2b_s34b_b79k").freeze()
    assert loaded.identity()["weights"] == {
        "open_clip_tag": "laion2b_s34b_b79k",
        **_hub_identity(link),
    }
    torch.testing.assert_close(_embed(loaded), _embed(source), rtol=0, atol=0)


# -- unpickling: only with model.trust_checkpoint=true ---------------------------------------
class _RunsCode:
    """Unpickling it creates a file: what a crafted checkpoint could do with any code."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _crafted_lightning_checkpoint(tmp_path, marker):
    torch.manual_seed(11)
    source = _timm(pretrained=False)
    path = tmp_path / "crafted.ckpt"
    torch.save(
        {
            "state_dict": {f"extractor.{k}": v for k, v in source.model.state_dict().items()},
            "hyper_parameters": {"lr": 1e-4, "payload": _RunsCode(marker)},
        },
        path,
    )
    return source, path


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    _, path = _crafted_lightning_checkpoint(tmp_path, marker)
    with pytest.raises(UntrustedCheckpointError) as info:
        _timm(checkpoint=str(path))
    message = str(info.value)
    assert str(path) in message and "model.trust_checkpoint=true" in message
    assert not marker.exists()


def test_a_trusted_checkpoint_is_unpickled(tmp_path) -> None:
    marker = tmp_path / "ran"
    source, path = _crafted_lightning_checkpoint(tmp_path, marker)
    loaded = _timm(checkpoint=str(path), trust_checkpoint=True)
    assert marker.exists()  # the opt-in does what it says
    torch.testing.assert_close(_embed(loaded), _embed(source), rtol=0, atol=0)
    # the opt-in changes how the file is read, not the embeddings: same store identity
    assert loaded.identity() == _timm(checkpoint=str(path), trust_checkpoint=True).identity()


def test_lightning_checkpoint_with_plain_hyper_parameters_loads_by_default(tmp_path) -> None:
    torch.manual_seed(12)
    source = _timm(pretrained=False)
    path = tmp_path / "plain.ckpt"
    torch.save(
        {
            "state_dict": {f"extractor.{k}": v for k, v in source.model.state_dict().items()},
            "hyper_parameters": {  # as Lightning writes them: dict(model.hparams)
                "lr": 1e-4,
                "out_dir": pathlib.Path("/runs/x"),
                "args": argparse.Namespace(epochs=3),
            },
            "pytorch-lightning_version": "2.6.0",
        },
        path,
    )
    torch.testing.assert_close(_embed(_timm(checkpoint=str(path))), _embed(source), rtol=0, atol=0)


def test_a_layout_the_converter_cannot_map_is_one_line_but_its_bugs_are_tracebacks() -> None:
    linear = torch.nn.Linear(2, 2)
    foreign = {"fc.w": torch.zeros(2, 2), "fc.b": torch.zeros(2)}

    def mapped(sd):
        return {"weight": sd["fc.w"], "bias": sd["fc.b"]}

    assert load_into(linear, foreign, label="tiny", convert=mapped) is not None

    def unmappable(sd):
        return {"weight": sd["fc.weight"]}  # KeyError: not the layout it maps

    with pytest.raises(CheckpointError, match="could not be converted for tiny"):
        load_into(linear, foreign, label="tiny", convert=unmappable)

    def buggy(sd):
        return {key.upper(): value for key, value in sd.itemz()}  # AttributeError: a bug

    with pytest.raises(AttributeError):
        load_into(linear, foreign, label="tiny", convert=buggy)
