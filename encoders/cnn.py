"""CNN encoder on a timm backbone: masked patches are blanked in the image, the output feature map is the
token grid (one token per ``stride`` × ``stride`` patch)."""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_encoder
from .vit import gather_tokens


class CNNEncoder(nn.Module):
    """forward(images (B, C, H, W), keep_idx (B, K) | None, key_padding_mask (B, K) | None) -> (B, K, D).

    With ``keep_idx`` the pixels of every patch not kept (or only kept as padding) are set to 0 (the
    normalised mean colour) before the backbone runs; the output tokens are the feature-map cells at
    ``keep_idx``. D is the backbone's channel count, the patch size its total stride.
    """

    def __init__(self, name: str, drop_path: float = 0.0):
        super().__init__()
        try:
            self.backbone = timm.create_model(name, pretrained=False, num_classes=0, global_pool="",
                                              drop_path_rate=drop_path)
        except RuntimeError as err:
            raise ValueError(f"model.encoder 'cnn:{name}' is not a timm model ({err})") from err
        self.timm_name = name
        self.embed_dim = self.backbone.num_features
        self.patch_size = self.backbone.feature_info[-1]["reduction"]
        self.norm = nn.LayerNorm(self.embed_dim, eps=1e-6)

    def token_grid(self, input_shape) -> tuple[int, int]:
        """(C, H, W) -> the (H/stride, W/stride) feature-map grid."""
        height, width = input_shape[-2:]
        return height // self.patch_size, width // self.patch_size

    def blank(self, images: torch.Tensor, keep_idx: torch.Tensor, key_padding_mask: torch.Tensor | None):
        grid_h, grid_w = self.token_grid(images.shape)
        keep = torch.ones_like(keep_idx, dtype=images.dtype)
        if key_padding_mask is not None:
            keep = keep.masked_fill(key_padding_mask, 0)
        visible = torch.zeros(images.shape[0], grid_h * grid_w, device=images.device, dtype=images.dtype)
        visible = visible.scatter_add(1, keep_idx, keep).clamp_(max=1).view(-1, 1, grid_h, grid_w)
        visible = F.interpolate(visible, scale_factor=self.patch_size, mode="nearest")
        return images[..., : grid_h * self.patch_size, : grid_w * self.patch_size] * visible

    def forward(self, images, keep_idx=None, key_padding_mask=None):
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the CNN stride {self.patch_size}")
        if keep_idx is not None:
            images = self.blank(images, keep_idx, key_padding_mask)
        tokens = self.norm(self.backbone.forward_features(images).flatten(2).transpose(1, 2))
        return tokens if keep_idx is None else gather_tokens(tokens, keep_idx)

    def intermediate_layers(self, images, count: int) -> list[torch.Tensor]:
        """The last ``count`` stages' feature maps as tokens (B, h_i*w_i, C_i), oldest first; the last one is
        ``forward`` (token-normed), the earlier ones are timm's raw stage outputs."""
        if count == 1:
            return [self(images)]
        maps = self.backbone.forward_intermediates(images, indices=count, intermediates_only=True)
        return [m.flatten(2).transpose(1, 2) for m in maps[:-1]] + [self(images)]


@register_encoder("cnn:", prefix=True)
def cnn(timm_name: str, drop_path: float = 0.0) -> CNNEncoder:
    return CNNEncoder(timm_name, drop_path=drop_path)
