"""One weight-name table between our ViT and the Hugging Face ``IJepaModel`` hub checkpoint, read in both directions.

Ours (timm ``Block`` names) -> HF: ``patch_embed.proj`` -> ``embeddings.patch_embeddings.projection``,
``norm`` -> ``layernorm``, and per block ``i``: ``attn.proj`` -> ``attention.output.dense``, ``norm1`` /
``norm2`` -> ``layernorm_before`` / ``layernorm_after``, ``mlp.fc1`` / ``mlp.fc2`` -> ``intermediate.dense`` /
``output.dense``; our fused ``attn.qkv`` rows are HF's ``attention.attention.{query,key,value}``. HF's
``embeddings.position_embeddings`` holds our fixed sin-cos table (computed, not stored, on our side).
"""
from __future__ import annotations

import torch

TOP = (("patch_embed.proj", "embeddings.patch_embeddings.projection"), ("norm", "layernorm"))
BLOCK = (("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
         ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
QKV, QKV_PARTS = "attn.qkv", ("query", "key", "value")
POSITIONS = "embeddings.position_embeddings"


def name_pairs(depth: int) -> list[tuple[str, str]]:
    """(our parameter prefix, HF prefix) for every one-to-one mapped module."""
    pairs = list(TOP)
    for i in range(depth):
        pairs += [(f"blocks.{i}.{ours}", f"encoder.layer.{i}.{hf}") for ours, hf in BLOCK]
    return pairs


def to_hf(state: dict[str, torch.Tensor], depth: int, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our ViT state dict -> IJepaModel keys; ``positions`` (1, N, D) is written as the position table."""
    out = {POSITIONS: positions}
    for ours, hf in name_pairs(depth):
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in state:
                out[f"{hf}.{kind}"] = state[f"{ours}.{kind}"]
    for i in range(depth):
        for kind in ("weight", "bias"):
            fused = state.get(f"blocks.{i}.{QKV}.{kind}")
            if fused is not None:
                for part, rows in zip(QKV_PARTS, fused.chunk(3, dim=0)):
                    out[f"encoder.layer.{i}.attention.attention.{part}.{kind}"] = rows
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf`` (the position table is dropped: ours is computed)."""
    out = {}
    for ours, name in name_pairs(depth):
        for kind in ("weight", "bias"):
            if f"{name}.{kind}" in hf:
                out[f"{ours}.{kind}"] = hf[f"{name}.{kind}"]
    for i in range(depth):
        for kind in ("weight", "bias"):
            parts = [hf.get(f"encoder.layer.{i}.attention.attention.{part}.{kind}") for part in QKV_PARTS]
            if parts[0] is not None:
                out[f"blocks.{i}.{QKV}.{kind}"] = torch.cat(parts, 0)
    return out
