"""Vision Transformer encoder that runs only the tokens it is asked to keep.

Blocks are timm's (SDPA attention); the patch embedding and the 2-D sin-cos positions are ours so the encoder
runs at any H×W divisible by the patch size. Parameter names follow timm's ``VisionTransformer``
(``patch_embed.proj``, ``blocks.i``, ``norm``) so export is a rename-free copy.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import Block

from .layers import drop_path_rates, patchify_linear
from .pos_embed import sincos_table
from .registry import register_encoder

# name -> (embed_dim, depth, num_heads, mlp_ratio)
VIT_SIZES = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
}


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D): a strided convolution's weights (timm's layout), applied as one GEMM."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {self.patch_size}")
        return patchify_linear(images, self.proj)


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), idx (B, K) long -> (B, K, D)."""
    return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class TokenTransformer(nn.Module):
    """The kept-token forward shared by our ViTs: a subclass builds ``blocks`` and ``norm`` and defines
    ``embed_tokens(x, keep_idx) -> (tokens (B, K, D), extra keyword arguments of every block)``.

    ``checkpoint_blocks``: when gradients are on, the first that many blocks keep only their input for the backward
    pass and run again there (activation checkpointing: each such block's activation memory for about a third more
    of its compute; 0 none, the depth or more: all)."""

    checkpoint_blocks: int = 0

    def _run(self, x, keep_idx, key_padding_mask, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Outputs (B, K, D) of the blocks at the ascending indices ``blocks``, before the final norm; the blocks
        after the last of them are not run."""
        tokens, extra = self.embed_tokens(x, keep_idx)
        attn_mask = None if key_padding_mask is None else (~key_padding_mask)[:, None, None, :]
        recompute = self.checkpoint_blocks if torch.is_grad_enabled() else 0
        wanted, last = set(blocks), max(blocks)
        kept = []
        for i, block in enumerate(self.blocks):
            if i > last:
                break
            if i < recompute:
                tokens = checkpoint(block, tokens, attn_mask=attn_mask, use_reentrant=False, **extra)
            else:
                tokens = block(tokens, attn_mask=attn_mask, **extra)
            if i in wanted:
                kept.append(tokens)
        return kept

    def forward(self, x, keep_idx=None, key_padding_mask=None) -> torch.Tensor:
        return self.norm(self._run(x, keep_idx, key_padding_mask, (len(self.blocks) - 1,))[-1])

    def intermediate_layers(self, x, count: int, keep_idx=None, key_padding_mask=None) -> list[torch.Tensor]:
        """The final-normed outputs of the last ``count`` blocks, oldest first: ``count`` x (B, K, D); the last one
        equals ``forward``."""
        if not 1 <= count <= len(self.blocks):
            raise ValueError(f"intermediate layers: count {count} must be in [1, {len(self.blocks)}] (the depth)")
        return self.block_outputs(x, range(len(self.blocks) - count, len(self.blocks)), keep_idx, key_padding_mask)

    def block_outputs(self, x, blocks: Sequence[int], keep_idx=None, key_padding_mask=None) -> list[torch.Tensor]:
        """The final-normed outputs of the blocks at the strictly ascending indices ``blocks`` (0 = the first
        block): ``len(blocks)`` x (B, K, D); no block after the last index runs. ``block_outputs(x, [depth - 1])``
        equals ``[forward(x)]``."""
        blocks, depth = [int(i) for i in blocks], len(self.blocks)
        if not blocks or any(not 0 <= i < depth for i in blocks) or any(a >= b for a, b in zip(blocks, blocks[1:])):
            raise ValueError(f"block outputs: indices {blocks} must be strictly ascending in [0, {depth}) (the depth)")
        return [self.norm(out) for out in self._run(x, keep_idx, key_padding_mask, blocks)]


class VisionTransformer(TokenTransformer):
    """ViT without a class token (the encoder protocol of ``encoders.registry``).

    forward(images (B, C, H, W), keep_idx (B, K) long | None, key_padding_mask (B, K) bool | None) -> (B, K, D)
    (K = H/p * W/p when ``keep_idx`` is None). Padding entries of ``keep_idx`` may hold any valid index.
    """

    def __init__(
        self,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        in_chans: int = 3,
        checkpoint_blocks: int = 0,
    ):
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, norm_layer=_layer_norm)
            for rate in drop_path_rates(drop_path, depth)
        )
        self.norm = _layer_norm(embed_dim)
        init_vit_weights(self)

    def token_grid(self, input_shape) -> tuple[int, int]:
        """(C, H, W) (or (..., H, W)) -> the (H/p, W/p) token grid."""
        height, width = input_shape[-2:]
        return height // self.patch_size, width // self.patch_size

    def embed(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.patch_embed(images)
        table = sincos_table(self.embed_dim, self.token_grid(images.shape), tokens.device, tokens.dtype)
        tokens = tokens + table.unsqueeze(0)
        return tokens if keep_idx is None else gather_tokens(tokens, keep_idx)

    def embed_tokens(self, images, keep_idx=None) -> tuple[torch.Tensor, dict]:
        return self.embed(images, keep_idx), {}


def _layer_norm(dim: int, **factory_kwargs) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **factory_kwargs)


def init_vit_weights(model: nn.Module) -> None:
    """Truncated-normal(0.02) linears, unit LayerNorms, and each block's output projections scaled by
    1/sqrt(2 * layer) (the I-JEPA initialisation)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for layer, block in enumerate(getattr(model, "blocks", []), start=1):
        for proj in _output_projections(block):
            proj.weight.data.div_(math.sqrt(2.0 * layer))


def _output_projections(block: nn.Module) -> list[nn.Linear]:
    out = []
    attn = getattr(block, "attn", None)
    if attn is not None and isinstance(getattr(attn, "proj", None), nn.Linear):
        out.append(attn.proj)
    mlp = getattr(block, "mlp", None)
    if mlp is not None and isinstance(getattr(mlp, "fc2", None), nn.Linear):
        out.append(mlp.fc2)
    return out


def _vit_builder(size: str):
    dim, default_depth, heads, mlp_ratio = VIT_SIZES[size]

    def build(patch_size: int = 16, drop_path: float = 0.0, qkv_bias: bool = True, embed_dim: int | None = None,
              depth: int | None = None, num_heads: int | None = None,
              checkpoint_blocks: int = 0) -> VisionTransformer:
        """``embed_dim``/``depth``/``num_heads`` override the named size (small test models)."""
        return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim or dim, depth=depth or default_depth,
                                 num_heads=num_heads or heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                 drop_path=drop_path, checkpoint_blocks=checkpoint_blocks)

    return build


for _size in VIT_SIZES:
    register_encoder(_size)(_vit_builder(_size))
