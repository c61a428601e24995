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


def _rename(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``{new.weight/bias: state[old.weight/bias]}`` for every (old, new) module prefix present in ``state``."""
    return {f"{new}.{kind}": state[f"{old}.{kind}"] for old, new in pairs for kind in ("weight", "bias")
            if f"{old}.{kind}" in state}


def _qkv_names(depth: int, kind: str):
    return [(f"blocks.{i}.{QKV}.{kind}", [f"encoder.layer.{i}.attention.attention.{part}.{kind}" for part in QKV_PARTS])
            for i in range(depth)]


def to_hf(state: dict[str, torch.Tensor], depth: int, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our ViT state dict -> IJepaModel keys; ``positions`` (1, N, D) is written as the position table."""
    out = {POSITIONS: positions, **_rename(state, name_pairs(depth))}
    for kind in ("weight", "bias"):
        for fused, parts in _qkv_names(depth, kind):
            if fused in state:
                out.update(zip(parts, state[fused].chunk(3, dim=0)))
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf`` (the position table is dropped: ours is computed)."""
    out = _rename(hf, [(theirs, ours) for ours, theirs in name_pairs(depth)])
    for kind in ("weight", "bias"):
        for fused, parts in _qkv_names(depth, kind):
            if parts[0] in hf:
                out[fused] = torch.cat([hf[part] for part in parts], 0)
    return out
