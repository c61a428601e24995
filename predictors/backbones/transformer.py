"""Transformer backbone on timm attention (SDPA), with key padding, optional gated attention, causal masking and
pre- or post-norm blocks.

Gated attention (Qiu et al., NeurIPS 2025): a sigmoid gate computed from the block's (normed) input
multiplies the SDPA output element-wise before the output projection; timm's ``Attention(gated=True)``
implements exactly that.

``norm="pre"`` (default) stacks timm ViT blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))``; ``norm="post"`` stacks
BERT-style blocks ``LN1(x + attn(x))``, ``LN2(x + mlp(x))`` (exact GELU), built from timm's ``Attention`` (fused qkv)
and ``Mlp``, so that a BERT encoder's layers load into it (``predictors/minilm_init.py``).
``causal=True``: token i attends to tokens j <= i of the input sequence (``pos`` plays no part).
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import Attention, DropPath, LayerNorm, Mlp
from timm.models.vision_transformer import Block

from encoders.layers import drop_path_rates

from . import register_backbone

_NORMS = ("pre", "post")
# timm >= 1.0.2x passes is_causal through Block / Attention to SDPA; older ones take an explicit mask only
_TIMM_IS_CAUSAL = all("is_causal" in inspect.signature(f).parameters for f in (Attention.forward, Block.forward))


def padding_attn_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) bool, True at padding -> SDPA boolean mask (B, 1, 1, L), True where attention is allowed."""
    if key_padding_mask is None:
        return None
    return (~key_padding_mask)[:, None, None, :]


def attention_mask(key_padding_mask: torch.Tensor | None, causal: bool, length: int,
                   device) -> tuple[torch.Tensor | None, bool]:
    """-> (attn_mask, is_causal) for SDPA over a sequence of ``length`` tokens.

    Not causal: the padding mask (B, 1, 1, L) or None. Causal without padding: (None, True) (SDPA's own causal
    path). Causal with padding: a boolean (B, 1, L, L) mask, True where query i may attend key j: j <= i and j is
    not padding, plus the diagonal, so that a padding query with only padding before it still has a key (an empty
    row would give NaN, which masked-out values then spread through the next layer's ``0 * NaN``).
    """
    if not causal:
        return padding_attn_mask(key_padding_mask), False
    if key_padding_mask is None and _TIMM_IS_CAUSAL:
        return None, True
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if key_padding_mask is None:
        return allowed, False
    diagonal = torch.eye(length, dtype=torch.bool, device=device)
    return (allowed & ~key_padding_mask[:, None, None, :]) | diagonal, False


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


class PostNormBlock(nn.Module):
    """BERT-style block: ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))`` with exact GELU in the MLP.

    forward(x (B, L, D), attn_mask (B, 1, 1 | L, L) bool | None, is_causal) -> (B, L, D). Submodule names match
    timm's ``Block`` (attn.qkv, attn.proj, norm1, mlp.fc1, mlp.fc2, norm2).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, attn_layer: type[nn.Module] = Attention, norm_eps: float = 1e-6):
        super().__init__()
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        causal = {"is_causal": True} if is_causal else {}
        x = self.norm1(x + self.drop_path1(self.attn(x, attn_mask=attn_mask, **causal)))
        return self.norm2(x + self.drop_path2(self.mlp(x)))


@register_backbone("transformer")
class TransformerBackbone(nn.Module):
    """Stack of pre-norm ViT blocks (default) or post-norm BERT-style blocks.

    forward(x (B, L, D), pos (B, L) | None, key_padding_mask (B, L) bool | None) -> (B, L, D).
    ``pos`` is unused: positions are added to ``x`` by the caller, and ``causal`` follows the sequence order.
    ``norm_eps``: the blocks' LayerNorm epsilon (timm's 1e-6 by default; BERT uses 1e-12).
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
        causal: bool = False,
        norm: Literal["pre", "post"] = "pre",
        norm_eps: float = 1e-6,
        checkpoint_blocks: int = 0,
    ):
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks  # the first N blocks recompute in backward (see encoders.vit)
        if norm not in _NORMS:
            raise ValueError(f"transformer norm '{norm}' is unknown (expected one of {list(_NORMS)})")
        if norm_eps <= 0:
            raise ValueError(f"transformer norm_eps {norm_eps} must be > 0")
        attn = attention_layer(gated_attention)
        rates = drop_path_rates(drop_path, depth)
        if norm == "pre":
            norm_layer = partial(LayerNorm, eps=norm_eps)
            blocks = (Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, attn_layer=attn,
                            norm_layer=norm_layer) for rate in rates)
        else:
            blocks = (PostNormBlock(dim, num_heads, mlp_ratio, qkv_bias, rate, attn, norm_eps) for rate in rates)
        self.blocks = nn.ModuleList(blocks)
        self.causal = causal
        # what the module was built with (not state): lets e.g. the MiniLM initialisation check the architecture
        self.options = dict(dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                            gated_attention=gated_attention, causal=causal, norm=norm, norm_eps=norm_eps)

    def forward(self, x, pos=None, key_padding_mask=None):
        attn_mask, is_causal = attention_mask(key_padding_mask, self.causal, x.shape[1], x.device)
        causal = {"is_causal": True} if is_causal else {}
        recompute = self.checkpoint_blocks if torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            if i < recompute:
                x = checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False, **causal)
            else:
                x = block(x, attn_mask=attn_mask, **causal)
        return x
