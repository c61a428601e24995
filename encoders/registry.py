"""The encoder registry and protocol.

Every registered encoder is an ``nn.Module`` with
- ``embed_dim``: the token width D;
- ``token_grid(input_shape) -> tuple[int, ...]``: the token grid for one input of shape (C, H, W) or (C, T, H, W);
- ``forward(x, keep_idx=None, key_padding_mask=None) -> (B, K, D)``: the final-normed tokens at ``keep_idx``
  (B, K) long (all N tokens in raster order when None); ``key_padding_mask`` (B, K) bool is True at padding;
- ``intermediate_layers(x, count) -> list of count (B, N_i, D_i)``: the last ``count`` blocks / stages, oldest first.
- optionally (the ViTs) ``block_outputs(x, blocks) -> list of len(blocks) (B, N, D)``: the final-normed outputs of
  the blocks at the given ascending indices (multi-layer targets, ``loss.target_layers``).

Names: ``vit_<size>`` (``encoders/vit.py``) and ``cnn:<timm backbone>`` (``encoders/cnn.py``); a family whose
names carry a free part (``cnn:``) registers a prefix.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch.nn as nn

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}
_PREFIXES: dict[str, Callable[..., nn.Module]] = {}  # 'cnn:' -> builder(name_after_prefix, **options)
_ENCODER_MODULES = ("vit", "cnn", "vit_video")  # each module registers its encoders on import


def register_encoder(name: str, prefix: bool = False):
    """Decorator adding an encoder builder: ``fn(**options)`` for a name, ``fn(rest, **options)`` for a prefix."""

    def wrap(fn):
        (_PREFIXES if prefix else _ENCODERS)[name] = fn
        return fn

    return wrap


def _import_all() -> None:
    for module in _ENCODER_MODULES:
        importlib.import_module(f"{__package__}.{module}")


def available_encoders() -> list[str]:
    _import_all()
    return sorted(_ENCODERS) + [f"{p}<name>" for p in sorted(_PREFIXES)]


def _builder(name: str) -> tuple[Callable[..., nn.Module], tuple]:
    _import_all()
    if name in _ENCODERS:
        return _ENCODERS[name], ()
    for prefix, fn in _PREFIXES.items():
        if name.startswith(prefix):
            return fn, (name[len(prefix):],)
    raise ValueError(f"model.encoder '{name}' is unknown (expected one of {available_encoders()})")


def encoder_options(name: str, options: dict) -> dict:
    """The entries of ``options`` that encoder ``name`` takes (a config section holds every family's options;
    e.g. a CNN has no ``patch_size``: its patch is its stride)."""
    fn, args = _builder(name)
    accepted = set(list(inspect.signature(fn).parameters)[len(args):])
    return {k: v for k, v in options.items() if k in accepted}


def build_encoder(name: str, **options) -> nn.Module:
    """Build encoder ``name``; an option it does not take is an error naming it."""
    fn, args = _builder(name)
    accepted = list(inspect.signature(fn).parameters)[len(args):]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"encoder '{name}' takes no option(s) {unknown} (its options: {accepted})")
    return fn(*args, **options)
