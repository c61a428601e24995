"""Video Vision Transformer (the V-JEPA / V-JEPA 2 encoder) that runs only the tokens it is asked to keep.

Tokens: a Conv3d tubelet embedding (kernel = stride = ``tubelet_size`` x ``patch_size`` x ``patch_size``) of a clip
(B, C, T, H, W) gives the (T/t, H/p, W/p) grid, flattened in space-time raster order: token ``(i*H' + j)*W' + k``
is tubelet ``i`` in time, row ``j``, column ``k``.

Images: an image (B, C, H, W) — and a one-frame clip (B, C, 1, H, W) — is repeated to ``tubelet_size`` frames, as
V-JEPA 2 does, and gives the (1, H/p, W/p) grid; ``token_grid((C, H, W)) == (1, H/p, W/p)``. Any other T must be a
multiple of the tubelet, H and W multiples of the patch (``ValueError`` naming the shape otherwise).

Positions (``pos``), computed for the actual grid of each input, so any T x H x W runs:

- ``"sincos"`` (default): the shared 3-D sin-cos table ``encoders.pos_embed.sincos_table`` added after the tubelet
  embedding; time, rows and columns each own a third of the channels. When D is not a multiple of 6 (ViT-L 1024,
  ViT-H 1280) the table covers the largest multiple of 6 below D and the last ``D mod 6`` channels get no position
  (the sin-cos table needs an even block per axis). V-JEPA 1 split the channels unevenly (D/2 time, D/4 rows, D/4
  columns); ours is the project's one sin-cos rule for every grid rank.
- ``"rope"``: V-JEPA 2's 3-D rotary embedding inside attention, no additive table. The head dim ``d`` is cut into
  three blocks of ``a = 2 * (d // 6)`` channels for (t, h, w), in that order; the last ``d - 3a`` channels are not
  rotated. In each block, with frequencies ``w_k = 10000^(-k / (a/2))`` (k < a/2) and ``f = position * w``, every
  channel pair (2m, 2m+1) is mixed as ``out = x * cos(F) + rot(x) * sin(F)`` with ``rot(x)[2m] = -x[2m+1]``,
  ``rot(x)[2m+1] = x[2m]`` and ``F = [f_0 .. f_{a/2-1}, f_0 .. f_{a/2-1}]`` (the angles are *concatenated* twice,
  not interleaved, while the pairs are interleaved: channels 2m and 2m+1 get the angles of frequencies
  ``2m mod a/2`` and ``(2m+1) mod a/2``). That is exactly ``transformers.VJEPA2Model`` (and the original V-JEPA 2
  code), so ``jepa.export_vjepa2`` is a pure weight rename. With ``keep_idx`` each kept token is rotated by the
  position of its own grid index.

Blocks: timm's ``Block`` for ``sincos``; for ``rope`` the same block with timm's ``AttentionRope`` (fused ``qkv``,
SDPA, no prefix tokens) fed the rotation table. Both keep timm's parameter names (``patch_embed.proj``,
``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``). LayerNorm eps 1e-6, GELU, I-JEPA
initialisation (``encoders.vit.init_vit_weights``, the Conv3d included). The kept-token forward is
``encoders.vit.TokenTransformer``'s.
"""
from __future__ import annotations

import functools

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .layers import drop_path_rates, patchify_linear
from .pos_embed import sincos_1d, sincos_table
from .registry import register_encoder
from .vit import VIT_SIZES, TokenTransformer, _layer_norm, gather_tokens, init_vit_weights

POSITIONS = ("sincos", "rope")
VIDEO_SIZES = ("tiny", "small", "base", "large", "huge")  # vit_video_<size>, sizes of encoders.vit.VIT_SIZES


def rope_axis_dim(head_dim: int) -> int:
    """Channels of a head rotated per axis (t, h, w): the largest even number <= head_dim / 3."""
    return 2 * (head_dim // 6)


@functools.lru_cache(maxsize=64)
def rope_table(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """(N, 2 * head_dim) fp32 ``[sin(F) | cos(F)]`` per token of ``grid`` in raster order, the layout of timm's
    ``apply_rot_embed_cat`` (interleaved pairs); channels past the three axis blocks get sin 0, cos 1 (unrotated).
    Cached per (head_dim, grid, device): callers must not modify it."""
    axis_dim = rope_axis_dim(head_dim)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, 3)
    sin, cos = [], []
    for axis in range(3):
        axis_sin, axis_cos = sincos_1d(axis_dim, coords[:, axis]).chunk(2, dim=1)  # (N, axis_dim / 2) each
        sin += [axis_sin, axis_sin]
        cos += [axis_cos, axis_cos]
    rest = head_dim - 3 * axis_dim
    sin.append(torch.zeros(len(coords), rest))
    cos.append(torch.ones(len(coords), rest))
    return torch.cat(sin + cos, dim=1).to(device)


class TubeletEmbed(nn.Module):
    """(B, C, T, H, W) -> (B, T/t * H/p * W/p, D), space-time raster order: a strided Conv3d's weights applied as
    one GEMM."""

    def __init__(self, tubelet_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return patchify_linear(video, self.proj)


class RopeBlock(Block):
    """timm's pre-norm ``Block`` whose attention is timm's ``AttentionRope``: ``forward(x, attn_mask, rope)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path,
                         norm_layer=_layer_norm)
        try:
            from timm.layers import AttentionRope
        except ImportError as err:  # older timm: the sin-cos variant still works
            raise ValueError(f"model.pos=rope needs timm's AttentionRope, which timm {timm.__version__} lacks "
                             f"(install a newer timm, or use model.pos=sincos)") from err
        self.attn = AttentionRope(dim, num_heads, qkv_bias=qkv_bias, qkv_fused=True, num_prefix_tokens=0)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VideoTransformer(TokenTransformer):
    """Video ViT without a class token (the encoder protocol of ``encoders.registry``).

    forward(video (B, C, T, H, W) or image (B, C, H, W), keep_idx (B, K) long | None, key_padding_mask (B, K) bool
    | None) -> (B, K, D) (K = T/t * H/p * W/p when ``keep_idx`` is None). Padding entries of ``keep_idx`` may hold
    any valid index; padding never changes the real tokens' outputs.
    """

    def __init__(
        self,
        patch_size: int = 16,
        tubelet_size: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        in_chans: int = 3,
        pos: str = "sincos",
        checkpoint_blocks: int = 0,
    ):
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        if pos not in POSITIONS:
            raise ValueError(f"video ViT pos '{pos}' is unknown (expected one of {list(POSITIONS)})")
        if embed_dim % num_heads:
            raise ValueError(f"video ViT embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.patch_size, self.tubelet_size, self.in_chans = patch_size, tubelet_size, in_chans
        self.embed_dim, self.num_heads, self.mlp_ratio, self.pos = embed_dim, num_heads, mlp_ratio, pos
        self.patch_embed = TubeletEmbed(tubelet_size, patch_size, in_chans, embed_dim)
        if pos == "rope":
            blocks = (RopeBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rate)
                      for rate in drop_path_rates(drop_path, depth))
        else:
            blocks = (Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate,
                            norm_layer=_layer_norm) for rate in drop_path_rates(drop_path, depth))
        self.blocks = nn.ModuleList(blocks)
        self.norm = _layer_norm(embed_dim)
        init_vit_weights(self)

    def token_grid(self, input_shape) -> tuple[int, int, int]:
        """(C, T, H, W) -> (T/t, H/p, W/p); an image (C, H, W) or a one-frame clip -> (1, H/p, W/p)."""
        shape = tuple(int(n) for n in input_shape)
        if len(shape) not in (3, 4):
            raise ValueError(f"video ViT input shape {shape} has rank {len(shape)} (expected (C, T, H, W) for a "
                             f"clip or (C, H, W) for an image)")
        channels, frames, (height, width) = shape[0], (shape[1] if len(shape) == 4 else 1), shape[-2:]
        if channels != self.in_chans:
            raise ValueError(f"video ViT input shape {shape} has {channels} channels (expected {self.in_chans})")
        if frames != 1 and frames % self.tubelet_size:
            raise ValueError(f"video ViT input shape {shape}: {frames} frames is not a multiple of the tubelet "
                             f"size {self.tubelet_size} (or 1, an image)")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"video ViT input shape {shape}: size {height}x{width} is not divisible by patch "
                             f"size {self.patch_size}")
        return max(frames // self.tubelet_size, 1), height // self.patch_size, width // self.patch_size

    def as_video(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, C, T, H, W) or (B, C, H, W) -> (the clip the tubelet embedding sees, its token grid)."""
        if x.ndim not in (4, 5):
            raise ValueError(f"video ViT input shape {tuple(x.shape)} has rank {x.ndim} (expected (B, C, T, H, W) "
                             f"or an image batch (B, C, H, W))")
        grid = self.token_grid(x.shape[1:])
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.tubelet_size, -1, -1)
        return x, grid

    def embed(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None):
        """(tokens (B, K, D) with sin-cos positions added for ``sincos``, the RoPE table for those tokens: (N, 2d)
        or (B, 1, K, 2d) with ``keep_idx``; None for ``sincos``)."""
        video, grid = self.as_video(x)
        tokens = self.patch_embed(video)
        rope = None
        if self.pos == "sincos":
            covered = self.embed_dim - self.embed_dim % 6
            table = sincos_table(covered, grid, tokens.device, tokens.dtype)
            tokens = tokens + F.pad(table, (0, self.embed_dim - covered)).unsqueeze(0)
        else:
            rope = rope_table(self.embed_dim // self.num_heads, grid, tokens.device)
            if keep_idx is not None:
                rope = gather_tokens(rope.expand(len(keep_idx), -1, -1), keep_idx).unsqueeze(1)
        return (tokens if keep_idx is None else gather_tokens(tokens, keep_idx)), rope

    def embed_tokens(self, x, keep_idx=None) -> tuple[torch.Tensor, dict]:
        tokens, rope = self.embed(x, keep_idx)
        return tokens, ({} if rope is None else {"rope": rope})


def _video_builder(size: str):
    dim, default_depth, heads, mlp_ratio = VIT_SIZES[f"vit_{size}"]

    def build(patch_size: int = 16, tubelet_size: int = 2, drop_path: float = 0.0, qkv_bias: bool = True,
              embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
              pos: str = "sincos", checkpoint_blocks: int = 0) -> VideoTransformer:
        """``embed_dim``/``depth``/``num_heads`` override the named size (small test models); ``pos``: sincos |
        rope."""
        return VideoTransformer(patch_size=patch_size, tubelet_size=tubelet_size, embed_dim=embed_dim or dim,
                                depth=depth or default_depth, num_heads=num_heads or heads, mlp_ratio=mlp_ratio,
                                qkv_bias=qkv_bias, drop_path=drop_path, pos=pos, checkpoint_blocks=checkpoint_blocks)

    return build


for _size in VIDEO_SIZES:
    register_encoder(f"vit_video_{_size}")(_video_builder(_size))
