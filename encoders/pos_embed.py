"""Fixed sin-cos positional embeddings for any token grid (computed on the fly, cached per size)."""
from __future__ import annotations

import functools

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions (N,) float -> (N, dim): [sin(p w_k) ..., cos(p w_k) ...], w_k = 10000^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


@functools.lru_cache(maxsize=32)
def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(H*W, dim) in raster order: first half encodes the row, second half the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)
