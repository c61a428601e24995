"""Vision Transformer encoder that runs only the tokens it is asked to keep.

Blocks are timm's (SDPA attention); the patch embedding and the 2-D sin-cos positions are ours so the encoder
runs at any H×W divisible by the patch size. Parameter names follow timm's ``VisionTransformer``
(``patch_embed.proj``, ``blocks.i``, ``norm``) so export is a rename-free copy.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from .pos_embed import sincos_2d

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
    """(B, C, H, W) -> (B, H/p * W/p, D) by a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {self.patch_size}")
        return self.proj(images).flatten(2).transpose(1, 2)


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), idx (B, K) long -> (B, K, D)."""
    return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class VisionTransformer(nn.Module):
    """ViT without a class token.

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
        img_size: int = 224,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.img_size = img_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, norm_layer=_layer_norm)
            for rate in rates
        )
        self.norm = _layer_norm(embed_dim)
        init_vit_weights(self)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def pos_embed(self, grid_h: int, grid_w: int, device, dtype) -> torch.Tensor:
        """(1, H*W, D) fixed 2-D sin-cos table."""
        return sincos_2d(self.embed_dim, grid_h, grid_w).to(device=device, dtype=dtype).unsqueeze(0)

    def embed(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.patch_embed(images)
        tokens = tokens + self.pos_embed(*self.grid_size(*images.shape[-2:]), tokens.device, tokens.dtype)
        return tokens if keep_idx is None else gather_tokens(tokens, keep_idx)

    def forward(self, images, keep_idx=None, key_padding_mask=None, return_layers: int = 0):
        """With ``return_layers=n`` also returns the normed outputs of the last n blocks: list of (B, K, D)."""
        x = self.embed(images, keep_idx)
        attn_mask = None if key_padding_mask is None else (~key_padding_mask)[:, None, None, :]
        layers = []
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask=attn_mask)
            if return_layers and i >= len(self.blocks) - return_layers:
                layers.append(self.norm(x))
        out = self.norm(x)
        return (out, layers) if return_layers else out


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
        elif isinstance(module, nn.Conv2d):
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


def vit(name: str, patch_size: int = 16, img_size: int = 224, drop_path: float = 0.0, qkv_bias: bool = True,
        embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None) -> VisionTransformer:
    """Build a named ViT size; ``embed_dim``/``depth``/``num_heads`` override it (small test models)."""
    if name not in VIT_SIZES:
        raise ValueError(f"model.encoder '{name}' is unknown (expected one of {sorted(VIT_SIZES)} or cnn:<timm name>)")
    dim, default_depth, heads, mlp_ratio = VIT_SIZES[name]
    return VisionTransformer(
        patch_size=patch_size,
        embed_dim=embed_dim or dim,
        depth=depth or default_depth,
        num_heads=num_heads or heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        drop_path=drop_path,
        img_size=img_size,
    )
