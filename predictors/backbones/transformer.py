"""Pre-norm transformer backbone on timm blocks (SDPA), with key padding and optional gated attention.

Gated attention (Qiu et al., NeurIPS 2025): a sigmoid gate computed from the block's (normed) input
multiplies the SDPA output element-wise before the output projection; timm's ``Attention(gated=True)``
implements exactly that.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import Block

from encoders.layers import drop_path_rates

from . import register_backbone


def padding_attn_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) bool, True at padding -> SDPA boolean mask (B, 1, 1, L), True where attention is allowed."""
    if key_padding_mask is None:
        return None
    return (~key_padding_mask)[:, None, None, :]


class GatedAttention(Attention):
    """timm Attention with its output gate on (timm builds attention layers from a class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, gated=True, **kwargs)


def attention_layer(gated: bool) -> type[nn.Module]:
    if not gated:
        return Attention
    if "gated" not in inspect.signature(Attention.__init__).parameters:
        raise ValueError(
            "predictor.gated_attention=true needs timm's gated Attention (a newer timm); the installed timm lacks it"
        )
    return GatedAttention


@register_backbone("transformer")
class TransformerBackbone(nn.Module):
    """Stack of pre-norm ViT blocks.

    forward(x (B, L, D), pos (B, L) | None, key_padding_mask (B, L) bool | None) -> (B, L, D).
    ``pos`` is unused: positions are added to ``x`` by the caller.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        gated_attention: bool = False,
    ):
        super().__init__()
        attn = attention_layer(gated_attention)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, attn_layer=attn)
            for rate in drop_path_rates(drop_path, depth)
        )

    def forward(self, x, pos=None, key_padding_mask=None):
        attn_mask = padding_attn_mask(key_padding_mask)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return x
