"""Hybrid backbone: Mamba-3 and attention blocks interleaved by a pattern string.

``pattern`` (e.g. ``"MMMA"``) is repeated and cut to ``depth``: ``M`` is a bidirectional Mamba-3 block
(``mamba3.Mamba3Block``), ``A`` a pre-norm timm ViT block (the transformer backbone's block, with optional gated
attention). Tokens are sorted by position once for the whole stack (attention does not depend on the order) and put
back in the input order at the end.

``causal=True`` makes the whole stack causal in position order: attention blocks mask keys after the query (in the
sorted order), and Mamba-3 blocks must scan forward only. It sets the mixers' ``bidirectional`` to ``"forward"`` when
that option is not given, and raises ValueError when it is given as anything else (a config section that holds the
default ``"split"`` must say ``bidirectional=forward``: no option is overridden silently).
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import Block

from encoders.layers import drop_path_rates

from . import register_backbone
from .mamba3 import Mamba3Block, Mamba3Mixer, SortedBackbone
from .transformer import attention_layer, attention_mask

_BLOCK_KINDS = {"M": "Mamba-3 block", "A": "attention block"}


def expand_pattern(pattern: str, depth: int) -> str:
    """'MMMA', 6 -> 'MMMAMM'. Raises ValueError naming a bad character or an empty pattern."""
    if not pattern:
        raise ValueError("hybrid pattern '' is empty (expected a string of 'M' (Mamba-3) and 'A' (attention))")
    for char in pattern:
        if char not in _BLOCK_KINDS:
            raise ValueError(
                f"hybrid pattern '{pattern}' has the character '{char}' (expected only 'M' (Mamba-3) and 'A' (attention))"
            )
    return (pattern * (depth // len(pattern) + 1))[:depth]


class AttentionBlock(nn.Module):
    """timm ``Block`` taking ``(x, padding)`` like the Mamba-3 block. forward(x (B, L, D), padding (B, L)) -> (B, L, D).
    ``causal``: token i attends to tokens j <= i of the (sorted) sequence."""

    def __init__(self, dim, num_heads, mlp_ratio, drop_path, gated_attention, qkv_bias=True, causal=False):
        super().__init__()
        self.block = Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path,
                           attn_layer=attention_layer(gated_attention))
        self.causal = causal

    def forward(self, x, padding=None):
        attn_mask, is_causal = attention_mask(padding, self.causal, x.shape[1], x.device)
        return self.block(x, attn_mask=attn_mask, **({"is_causal": True} if is_causal else {}))


class HybridBackbone(SortedBackbone):
    """forward(x (B, L, D), pos (B, L) long | None, key_padding_mask (B, L) bool | None) -> (B, L, D).

    ``mamba_options`` go to every Mamba-3 block's mixer (``Mamba3Mixer``'s options); ``causal``: see the module
    docstring."""

    def __init__(self, dim, depth, num_heads, pattern="MMMA", mlp_ratio=4.0, drop_path=0.0, gated_attention=False,
                 qkv_bias=True, causal=False, **mamba_options):
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"hybrid num_heads {num_heads} does not divide dim {dim}")
        self.pattern = expand_pattern(pattern, depth)
        if causal and "M" in self.pattern:
            direction = mamba_options.setdefault("bidirectional", "forward")
            if direction != "forward":
                raise ValueError(f"hybrid causal=True needs the Mamba-3 blocks to scan forward only, but bidirectional "
                                 f"is '{direction}' (set predictor.bidirectional=forward, or causal=False)")
        blocks = []
        for kind, rate in zip(self.pattern, drop_path_rates(drop_path, depth)):
            if kind == "M":
                blocks.append(Mamba3Block(dim, mlp_ratio, rate, **mamba_options))
            else:
                blocks.append(AttentionBlock(dim, num_heads, mlp_ratio, rate, gated_attention, qkv_bias, causal))
        super().__init__(blocks)


@register_backbone("hybrid", options_of=(HybridBackbone, Mamba3Mixer))
def hybrid(dim, depth, num_heads, **options):
    return HybridBackbone(dim, depth, num_heads, **options)
