"""Fixed sin-cos positional embeddings for a token grid of any rank, built once per (size, device) and cached."""
from __future__ import annotations

import functools
import math

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions (N,) float -> (N, dim): [sin(p w_k) ..., cos(p w_k) ...], w_k = 10000^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


@functools.lru_cache(maxsize=64)
def _table(dim: int, grid: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    rank = len(grid)
    if dim % (2 * rank):
        raise ValueError(f"{rank}-D sin-cos embedding needs dim divisible by {2 * rank}, got {dim}")
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, rank)
    table = torch.cat([sincos_1d(dim // rank, coords[:, axis]) for axis in range(rank)], dim=1)
    return table.to(device=device, dtype=dtype)


def sincos_table(dim: int, grid: tuple[int, ...], device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(prod(grid), dim) in raster order; axis ``a`` of the grid (rows, columns; time, rows, columns) takes the
    ``a``-th block of ``dim / rank`` channels. Cached per (dim, grid, device, dtype): callers must not modify it."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    grid = tuple(int(n) for n in grid)
    if not grid or math.prod(grid) <= 0:
        raise ValueError(f"sin-cos token grid {grid} must be non-empty with positive sizes")
    return _table(dim, grid, device, dtype)
