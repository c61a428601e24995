"""Small layer helpers shared by encoders and predictors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each of ``depth`` blocks: linear from 0 to ``drop_path`` (the ViT convention)."""
    return torch.linspace(0, drop_path, depth).tolist() if depth > 0 else []


def patchify_linear(x: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    """A patch/tubelet embedding convolution (kernel == stride, no padding) computed as one GEMM.

    x (B, C, *S) with every S_i divisible by the kernel -> (B, prod(S_i / k_i), D) in raster order, equal to
    ``conv(x).flatten(2).transpose(1, 2)``. cuDNN picks slow kernels for these large-stride convolutions under bf16
    autocast (about 1 ms per ViT-B/16 batch of 128 on an H200); the reshaped matmul runs on the tensor cores.
    """
    kernel = tuple(conv.kernel_size)
    batch, channels, *sizes = x.shape
    if len(sizes) != len(kernel) or any(s % k for s, k in zip(sizes, kernel)):
        raise ValueError(f"input size {'x'.join(map(str, sizes))} is not divisible by the patch "
                         f"{'x'.join(map(str, kernel))}")
    grid = [s // k for s, k in zip(sizes, kernel)]
    split = [d for pair in zip(grid, kernel) for d in pair]  # (g0, k0, g1, k1, ...)
    rank = len(kernel)
    order = [0] + [2 + 2 * i for i in range(rank)] + [1] + [3 + 2 * i for i in range(rank)]
    patches = x.reshape(batch, channels, *split).permute(*order).reshape(batch, -1, channels * math.prod(kernel))
    return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
