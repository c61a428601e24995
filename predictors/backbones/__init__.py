"""Sequence backbones for predictors, behind one interface.

Every backbone is an ``nn.Module`` with::

    forward(x: (B, L, D), pos: (B, L) long, key_padding_mask: (B, L) bool | None) -> (B, L, D)

``pos`` is each token's flat position on the token grid (raster order for images, space-time
raster order for video); order-aware backbones (``mamba3``) sort by it, attention ignores it
(positions are already added to ``x`` as embeddings). ``key_padding_mask`` is True at padding
tokens; a padding token must not change the output of any real token.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    """Decorator adding a backbone builder ``fn(dim, depth, num_heads, **kwargs)`` to the registry."""

    def wrap(fn):
        _BACKBONES[name] = fn
        return fn

    return wrap


def available_backbones() -> list[str]:
    _import_all()
    return sorted(_BACKBONES)


def build_backbone(name: str, dim: int, depth: int, num_heads: int, **kwargs) -> nn.Module:
    """Build backbone ``name`` (``transformer`` | ``mamba3`` | ``hybrid``)."""
    _import_all()
    if name not in _BACKBONES:
        raise ValueError(f"predictor.backbone '{name}' is unknown (expected one of {sorted(_BACKBONES)})")
    return _BACKBONES[name](dim=dim, depth=depth, num_heads=num_heads, **kwargs)


_BACKBONE_MODULES = ("transformer", "mamba3", "hybrid")  # each module registers its builders on import


def _import_all() -> None:
    import importlib

    for module in _BACKBONE_MODULES:
        importlib.import_module(f"{__name__}.{module}")
