"""Build a vision encoder from its config name: ``vit_<size>`` or ``cnn:<timm backbone>``."""
from __future__ import annotations

import torch.nn as nn

from .cnn import CNNEncoder
from .vit import vit


def build_encoder(name: str, patch_size: int = 16, img_size: int = 224, drop_path: float = 0.0,
                  qkv_bias: bool = True, embed_dim: int | None = None, depth: int | None = None,
                  num_heads: int | None = None) -> nn.Module:
    if name.startswith("cnn:"):
        return CNNEncoder(name[4:], img_size=img_size, drop_path=drop_path)
    return vit(name, patch_size=patch_size, img_size=img_size, drop_path=drop_path, qkv_bias=qkv_bias,
               embed_dim=embed_dim, depth=depth, num_heads=num_heads)
