"""`model.checkpoint`: weights from a local file (state dict, safetensors, Lightning checkpoint
with a prefix), no network; identical embeddings after a round trip; a new file changes the
embedding-store identity; mismatched keys list what did not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cbmir.extractors import create
from cbmir.extractors.checkpoint import CheckpointError, read_state_dict, strip_prefix

IMAGES = torch.randint(
    0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
)

TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}
TINY_CONCH = {
    "width": 64,
    "depth": 2,
    "heads": 2,
    "embed_dim": 32,
    "pooler_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def _timm(**kw):
    return create(
        "timm",
        model_name="vit_tiny_patch16_224",
        pool="cls",
        input_size=32,
        resize_mode="shortest",
        model_kwargs={"img_size": 32},
        **kw,
    ).freeze()


def _open_clip(config_path, **kw):
    return create("open_clip", model_name="tiny-clip", model_config=str(config_path), **kw).freeze()


def _conch(**kw):
    return create("conch", architecture=TINY_CONCH, input_size=32, **kw).freeze()


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
    source = create("medclip", pretrained=False).freeze()
    timm_state = source.vision_model.model.state_dict()
    hf: dict[str, torch.Tensor] = {}
    for k, v in timm_state.items():
        if k.startswith("patch_embed.proj."):
            hf["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("patch_embed.norm."):
            hf["embeddings.norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            hf["layernorm." + k.rsplit(".", 1)[1]] = v
        elif ".downsample." in k:
            stage, rest = k.split(".downsample.")
            hf[f"encoder.layers.{int(stage.split('.')[1]) - 1}.downsample.{rest}"] = v
        else:
            stage, block, inner = k.split(".", 4)[1], k.split(".", 4)[3], k.split(".", 4)[4]
            base = f"encoder.layers.{stage}.blocks.{block}."
            if inner.startswith("attn.qkv."):
                q, kk, vv = v.chunk(3, dim=0)
                leaf = inner.rsplit(".", 1)[1]
                for name, t in (("query", q), ("key", kk), ("value", vv)):
                    hf[f"{base}attention.self.{name}.{leaf}"] = t
            else:
                names = {
                    "norm1": "layernorm_before",
                    "norm2": "layernorm_after",
                    "attn.proj": "attention.output.dense",
                    "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
                    "mlp.fc1": "intermediate.dense",
                    "mlp.fc2": "output.dense",
                }
                for t_name, h_name in names.items():
                    if inner == t_name or inner.startswith(t_name + "."):
                        hf[base + h_name + inner[len(t_name) :]] = v
                        break
    state = {f"vision_model.model.{k}": v for k, v in hf.items()}
    state["vision_model.projection_head.weight"] = source.vision_model.projection_head.weight
    state["text_model.projection_head.weight"] = torch.zeros(512, 768)
    state["logit_scale"] = torch.tensor(3.0)
    path = _save(state, tmp_path / "pytorch_model.bin", "state_dict")
    loaded = create("medclip", checkpoint=str(path)).freeze()
    torch.testing.assert_close(_embed(loaded), _embed(source), rtol=0, atol=0)


def test_mismatched_keys_list_what_did_not_fit(tmp_path) -> None:
    torch.manual_seed(7)
    other = create("timm", model_name="resnet18", pretrained=False)
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


# -- the hub routes, offline: the download is faked, the loading is real ---------------------
def test_timm_tag_weights_load_through_timm(monkeypatch, tmp_path) -> None:
    from cbmir.extractors import hub

    torch.manual_seed(8)
    source = create("timm", model_name="resnet18", pretrained=False, pool="avg")
    state = dict(source.model.state_dict())
    state["fc.weight"], state["fc.bias"] = (
        torch.zeros(1000, 512),
        torch.zeros(1000),
    )  # as on the hub
    path = _save(state, tmp_path / "model.safetensors", "safetensors")
    asked = []
    monkeypatch.setattr(hub, "download", lambda repo, files, **kw: asked.append(repo) or str(path))
    loaded = create("timm", model_name="resnet18.tv_in1k", pretrained=True, pool="avg").freeze()
    assert asked == ["timm/resnet18.tv_in1k"]
    assert loaded.identity()["weights"] == "timm:resnet18.tv_in1k"
    torch.testing.assert_close(_embed(loaded), _embed(source.freeze()), rtol=0, atol=0)


def test_gated_hub_repo_weights_load_into_the_offline_architecture(monkeypatch, tmp_path) -> None:
    from cbmir.extractors import hub

    torch.manual_seed(9)
    source = _timm(pretrained=False)
    path = _save(source.model.state_dict(), tmp_path / "pytorch_model.bin", "state_dict")
    asked = []
    monkeypatch.setattr(
        hub,
        "download",
        lambda repo, files, gated=False, **kw: asked.append((repo, gated)) or str(path),
    )
    loaded = _timm(pretrained=True, hf_hub_id="SomeLab/some-gated-model", gated=True)
    assert asked == [("SomeLab/some-gated-model", True)]
    assert loaded.identity()["weights"] == "hf-hub:SomeLab/some-gated-model"
    torch.testing.assert_close(_embed(loaded), _embed(source), rtol=0, atol=0)


def test_open_clip_tag_weights_read_only_the_image_tower(monkeypatch, tmp_path) -> None:
    from cbmir.extractors import hub

    torch.manual_seed(10)
    source = create(
        "open_clip", model_name="ViT-B-32", weights="laion2b_s34b_b79k", pretrained=False
    ).freeze()
    state = {f"visual.{k}": v for k, v in source.model.visual.state_dict().items()}
    state["token_embedding.weight"] = torch.zeros(10, 512)
    path = _save(state, tmp_path / "open_clip_model.safetensors", "safetensors")
    asked = []
    monkeypatch.setattr(
        hub, "download", lambda repo, files, **kw: asked.append((repo, files)) or str(path)
    )
    loaded = create("open_clip", model_name="ViT-B-32", weights="laion2b_s34b_b79k").freeze()
    assert asked[0][0] == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert "open_clip_pytorch_model.bin" in asked[0][1]
    assert loaded.identity()["weights"] == "laion2b_s34b_b79k"
    torch.testing.assert_close(_embed(loaded), _embed(source), rtol=0, atol=0)
