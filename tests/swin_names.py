"""timm Swin keys -> transformers' `SwinModel` names, as in MedCLIP's published file."""

from __future__ import annotations

import torch


def hf_swin_names(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm Swin-T state dict under transformers' names (query/key/value split, patch
    merging at the end of the previous stage)."""
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
    return hf
