"""One resolver for the ``auto | bf16 | fp32`` precision settings of training and evaluation."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(setting: str, device_type: str) -> str:
    """``'auto'`` -> ``'bf16'`` on CUDA, ``'fp32'`` elsewhere; ``'bf16'``/``'fp32'`` as given."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision '{setting}' is unknown (expected one of {list(PRECISIONS)})")
    if setting == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return setting


def autocast_context(precision: str, device_type: str):
    """A zero-argument factory of the autocast context for a resolved precision (bf16 autocast or nothing)."""
    if precision == "bf16" and device_type in ("cuda", "cpu"):
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext
