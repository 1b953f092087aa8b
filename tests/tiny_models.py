"""Tiny stand-ins for big architectures, shared by the extractor tests (seconds, not minutes)."""

from __future__ import annotations

import copy

#: an open_clip ViT config (`open_clip_config.json` layout) small enough for a unit test
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
#: CONCH's image tower (ViT-B/16, 448 px in the real model), scaled down
TINY_CONCH = {
    "width": 64,
    "depth": 2,
    "heads": 2,
    "embed_dim": 32,
    "pooler_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def open_clip_with_layer_scale(ls_init_value: float = 1e-5) -> dict:
    """`TINY_OPEN_CLIP` with layer scale (`ls_init_value`), as in large CLIP towers."""
    config = copy.deepcopy(TINY_OPEN_CLIP)
    config["model_cfg"]["vision_cfg"]["ls_init_value"] = ls_init_value
    return config
