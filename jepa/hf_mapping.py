"""Weight-name tables between our ViTs and Hugging Face checkpoints, each read in both directions (``IJEPA`` here:
``IJepaModel``; ``jepa.export_vjepa2``: ``VJEPA2Model``).

Ours (timm ``Block`` names) -> HF: ``patch_embed.proj`` -> ``embeddings.patch_embeddings.projection``,
``norm`` -> ``layernorm``, and per block ``i``: ``attn.proj`` -> ``attention.output.dense``, ``norm1`` /
``norm2`` -> ``layernorm_before`` / ``layernorm_after``, ``mlp.fc1`` / ``mlp.fc2`` -> ``intermediate.dense`` /
``output.dense``; our fused ``attn.qkv`` rows are HF's ``attention.attention.{query,key,value}``. HF's
``embeddings.position_embeddings`` holds our fixed sin-cos table (computed, not stored, on our side).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

POSITIONS = "embeddings.position_embeddings"


@dataclass(frozen=True)
class NameTable:
    """Module-prefix pairs (ours, theirs) for the top level and each block ``i`` (theirs under ``layer``), and where
    their separate query/key/value of our fused ``attn.qkv`` sit in a block (``qkv``, with ``{part}``)."""

    top: tuple[tuple[str, str], ...]
    block: tuple[tuple[str, str], ...]
    layer: str = "encoder.layer.{i}"
    qkv: str = "attention.attention.{part}"

    def pairs(self, depth: int) -> list[tuple[str, str]]:
        out = list(self.top)
        for i in range(depth):
            out += [(f"blocks.{i}.{ours}", f"{self.layer.format(i=i)}.{theirs}") for ours, theirs in self.block]
        return out

    def qkv_keys(self, depth: int) -> list[tuple[str, list[str]]]:
        """(our fused qkv key, their three keys) for weights and biases of every block."""
        return [(f"blocks.{i}.attn.qkv.{kind}",
                 [f"{self.layer.format(i=i)}.{self.qkv.format(part=part)}.{kind}" for part in ("query", "key", "value")])
                for i in range(depth) for kind in ("weight", "bias")]

    def to_theirs(self, state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
        out = rename_modules(state, self.pairs(depth))
        for fused, parts in self.qkv_keys(depth):
            if fused in state:
                out.update(zip(parts, state[fused].chunk(3, dim=0)))
        return {k: v.contiguous() for k, v in out.items()}

    def to_ours(self, theirs: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
        out = rename_modules(theirs, [(t, o) for o, t in self.pairs(depth)])
        for fused, parts in self.qkv_keys(depth):
            if parts[0] in theirs:
                out[fused] = torch.cat([theirs[part] for part in parts], 0)
        return out


def rename_modules(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``{new.weight/bias: state[old.weight/bias]}`` for every (old, new) module prefix present in ``state``."""
    return {f"{new}.{kind}": state[f"{old}.{kind}"] for old, new in pairs for kind in ("weight", "bias")
            if f"{old}.{kind}" in state}


IJEPA = NameTable(
    top=(("patch_embed.proj", "embeddings.patch_embeddings.projection"), ("norm", "layernorm")),
    block=(("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
           ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")),
)


def to_hf(state: dict[str, torch.Tensor], depth: int, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our ViT state dict -> IJepaModel keys; ``positions`` (1, N, D) is written as the position table."""
    return {POSITIONS: positions.contiguous(), **IJEPA.to_theirs(state, depth)}


def from_hf(hf: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf`` (the position table is dropped: ours is computed)."""
    return IJEPA.to_ours(hf, depth)
