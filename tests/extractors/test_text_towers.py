"""Text towers: each built from the same weights file as upstream, its features equal the
upstream model's own `encode_text` (tiny random-weight models, the real bundled tokenizers)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tests.extractors.test_pretrained_reference import TINY_COCA, TINY_CONCH, images
from tests.hub_cache import add_file, torch_bytes

from cbmir.errors import ConfigError
from cbmir.extractors import text as text_towers

PROMPTS = ["a photo of a malignant lesion", "benign tissue", "pneumonia with consolidation"]
#: a tiny CLIP whose text tower uses open_clip's bundled BPE vocabulary (49408 tokens)
TINY_TEXT_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_files(tmp_path):
    """A tiny CLIP's config and full checkpoint (image + text towers), and the model."""
    import open_clip

    torch.manual_seed(5)
    model = open_clip.model.CLIP(**copy.deepcopy(TINY_TEXT_CLIP)).eval()
    config = tmp_path / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": TINY_TEXT_CLIP}))
    checkpoint = tmp_path / "clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return model, str(config), str(checkpoint)


def test_open_clip_text_equals_open_clip_encode_text(tmp_path) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    model, config, checkpoint = tiny_clip_files(tmp_path)
    tower = text_towers.build_text_encoder(
        {
            "_target_": text_towers.OPEN_CLIP_TARGET,
            "model_name": "tiny-clip",
            "model_config": config,
            "checkpoint": checkpoint,
            "normalize": True,  # an image-only setting: ignored by the text tower
        }
    )
    with torch.no_grad():
        tokens = SimpleTokenizer(context_length=16)(PROMPTS)
        reference = model.encode_text(tokens, normalize=True)
    ours = tower.encode_text(PROMPTS)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert tower.text_identity()["weights"].startswith("sha256:")


def test_conch_text_equals_coca_encode_text(tmp_path) -> None:
    pytest.importorskip("conch.open_clip_custom", reason="conch-fork is not installed")
    from conch.open_clip_custom import CoCa
    from conch.open_clip_custom.custom_tokenizer import get_tokenizer, tokenize

    # CONCH's bundled tokenizer: 32007 tokens, 127 + <cls> positions
    cfg = copy.deepcopy(TINY_COCA)
    cfg["text_cfg"].update(context_length=128, vocab_size=32007)
    cfg["multimodal_cfg"].update(context_length=128, vocab_size=32007)
    torch.manual_seed(6)
    coca = CoCa(**copy.deepcopy(cfg)).eval()
    checkpoint = tmp_path / "conch.bin"
    torch.save(coca.state_dict(), checkpoint)
    tower = text_towers.build_text_encoder(
        {
            "_target_": text_towers.CONCH_TARGET,
            "checkpoint": str(checkpoint),
            "architecture": TINY_CONCH,
            "text_cfg": cfg["text_cfg"],
            "backend": "builtin",
        }
    )
    tokenizer = get_tokenizer()
    if not hasattr(tokenizer, "batch_encode_plus"):  # transformers 5 dropped it: same call
        tokenizer.batch_encode_plus = tokenizer.__call__
    with torch.no_grad():
        reference = coca.encode_text(tokenize(tokenizer, PROMPTS), normalize=True)
    torch.testing.assert_close(tower.encode_text(PROMPTS), reference, rtol=1e-5, atol=1e-6)


def test_conch_projected_image_features_equal_coca_encode_image(hub_cache, tmp_path) -> None:
    """The text protocol's CONCH image entry: `encode_image(proj_contrast=True)`, its own key."""
    pytest.importorskip("conch.open_clip_custom", reason="conch-fork is not installed")
    from conch.open_clip_custom import CoCa

    from cbmir.extractors.conch import ConchExtractor

    torch.manual_seed(7)
    coca = CoCa(**copy.deepcopy(TINY_COCA)).eval()
    link = add_file(
        hub_cache,
        "MahmoodLab/conch",
        "pytorch_model.bin",
        torch_bytes(coca.state_dict(), tmp_path / "w"),
    )
    shared = ConchExtractor(architecture=TINY_CONCH, input_size=32, proj_contrast=True).freeze()
    paper = ConchExtractor(architecture=TINY_CONCH, input_size=32).freeze()
    batch = images(4, 32)
    with torch.no_grad():
        x = shared.preprocess(batch)
        reference = coca.encode_image(x, proj_contrast=True, normalize=True)
        torch.testing.assert_close(shared(batch), reference, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(paper(batch), reference, atol=1e-3)
    assert shared.identity() != paper.identity()  # a store entry of its own
    assert paper.identity()["features"] == "encode_image(proj_contrast=False)"  # old keys hold
    assert shared.identity()["weights"]["sha256"] == link.resolve().name


def test_shared_space_config_projects_conch_only() -> None:
    conch = {"_target_": text_towers.CONCH_TARGET, "name": "conch"}
    clip = {"_target_": text_towers.OPEN_CLIP_TARGET, "name": "biomedclip"}
    assert text_towers.shared_space_config(conch)["proj_contrast"] is True
    assert text_towers.shared_space_config(clip) == clip


def test_models_without_text_tower_are_refused_with_the_list() -> None:
    names = text_towers.models_with_text_tower()
    assert {"biomedclip", "conch", "medclip", "openclip_vitg14", "open_clip"} <= set(names)
    assert "resnet50" not in names and "uni" not in names
    with pytest.raises(ConfigError, match="biomedclip.*conch|conch.*biomedclip"):
        text_towers.check_text_tower({"_target_": "cbmir.extractors.timm_extractor.X"}, "uni")


def test_random_text_tower_is_seeded(tmp_path) -> None:
    _, config, _ = tiny_clip_files(tmp_path)
    spec = {
        "_target_": text_towers.OPEN_CLIP_TARGET,
        "model_name": "tiny-clip",
        "model_config": config,
        "pretrained": False,
    }
    a = text_towers.build_text_encoder({**spec, "seed": 1}).encode_text(PROMPTS)
    b = text_towers.build_text_encoder({**spec, "seed": 1}).encode_text(PROMPTS)
    c = text_towers.build_text_encoder({**spec, "seed": 2}).encode_text(PROMPTS)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(len(PROMPTS)))
    assert F.cosine_similarity(a[0], a[1], dim=0) < 0.9999  # prompts differ


def tiny_bert_dir(tmp_path):
    """A BERT folder (config.json, vocab.txt) standing in for Bio_ClinicalBERT's hub files."""
    from transformers import BertConfig, BertTokenizer

    words = sorted({w for p in PROMPTS for w in p.split()} | {"lesion", "normal"})
    folder = tmp_path / "bert"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
    )
    config.save_pretrained(folder)
    return folder, config


def test_medclip_text_equals_medclip_text_model(tmp_path) -> None:
    """MedCLIP's `MedCLIPTextModel.forward` (hidden states 1, 2, -1 of transformers' BERT,
    mean over tokens and layers, projection) + `encode_text`'s normalisation, on the same
    checkpoint keys (`text_model.model.*`, `text_model.projection_head.weight`)."""
    from transformers import AutoTokenizer, BertModel

    folder, config = tiny_bert_dir(tmp_path)
    torch.manual_seed(8)
    bert = BertModel(config).eval()
    projection = torch.nn.Linear(32, 512, bias=False)
    state = {f"text_model.model.{k}": v for k, v in bert.state_dict().items()}
    state["text_model.projection_head.weight"] = projection.weight.detach()
    state["vision_model.projection_head.weight"] = torch.zeros(512, 768)  # the image side
    torch.save(state, tmp_path / "medclip.bin")
    tower = text_towers.build_text_encoder(
        {
            "_target_": text_towers.MEDCLIP_TARGET,
            "checkpoint": str(tmp_path / "medclip.bin"),
            "bert_type": str(folder),
            "resize_mode": "pad",
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    rows = []
    with torch.no_grad():
        for prompt in PROMPTS:
            tokens = tokenizer(prompt, return_tensors="pt")
            hidden = bert(**tokens, output_hidden_states=True)["hidden_states"]
            stacked = torch.stack([hidden[1], hidden[2], hidden[-1]])
            rows.append(projection(stacked.permute(1, 0, 2, 3).mean(2).mean(1))[0])
    reference = F.normalize(torch.stack(rows), dim=-1)
    torch.testing.assert_close(tower.encode_text(PROMPTS), reference, rtol=1e-5, atol=1e-6)


def test_biomedclip_style_hf_text_equals_custom_text_clip(tmp_path) -> None:
    """BiomedCLIP's layout: an open_clip config whose text tower is a Hugging Face BERT
    (`hf_model_name`, its own tokenizer), under `text.*` in the checkpoint."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    folder, _ = tiny_bert_dir(tmp_path)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": TINY_TEXT_CLIP["vision_cfg"],
        "text_cfg": {
            "hf_model_name": str(folder),
            "hf_tokenizer_name": str(folder),
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 16,
            "hf_model_pretrained": False,  # as open_clip.create_model with a CLIP checkpoint
        },
    }
    torch.manual_seed(9)
    model = open_clip.model.CustomTextCLIP(**copy.deepcopy(cfg)).eval()
    torch.save(model.state_dict(), tmp_path / "biomedclip.pt")
    (tmp_path / "biomedclip.json").write_text(json.dumps({"model_cfg": cfg}))
    tower = text_towers.build_text_encoder(
        {
            "_target_": text_towers.OPEN_CLIP_TARGET,
            "model_name": "hf-hub:someone/tiny-biomedclip",
            "model_config": str(tmp_path / "biomedclip.json"),
            "checkpoint": str(tmp_path / "biomedclip.pt"),
        }
    )
    with torch.no_grad():
        reference = model.encode_text(HFTokenizer(str(folder), context_length=16)(PROMPTS), True)
    torch.testing.assert_close(tower.encode_text(PROMPTS), reference, rtol=1e-5, atol=1e-6)


def test_a_text_tower_without_its_package_is_refused_up_front(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "conch" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="conch-fork"):
        text_towers.check_text_tower({"_target_": text_towers.CONCH_TARGET}, "conch")
    text_towers.check_text_tower({"_target_": text_towers.MEDCLIP_TARGET}, "medclip")
