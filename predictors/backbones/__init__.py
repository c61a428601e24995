"""Sequence backbones for predictors, behind one interface.

Every backbone is an ``nn.Module`` with::

    forward(x: (B, L, D), pos: (B, L) long, key_padding_mask: (B, L) bool | None) -> (B, L, D)

``pos`` is each token's flat position on the token grid (raster order for images, space-time
raster order for video); order-aware backbones (``mamba3``) sort by it, attention ignores it
(positions are already added to ``x`` as embeddings). ``key_padding_mask`` is True at padding
tokens; a padding token must not change the output of any real token.

``build_backbone(name, dim, depth, num_heads, **options)`` takes exactly the options that ``backbone_options(name)``
lists (read from the builder's signature) and raises ValueError on any other.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
_POSITIONAL = ("dim", "depth", "num_heads")  # every builder's first arguments; its options are the rest


def register_backbone(name: str, options_of: tuple[Callable, ...] = ()):
    """Decorator adding a backbone builder ``fn(dim, depth, num_heads, **options)`` to the registry.

    The backbone's options are the builder's parameters after the first three. A builder that passes ``**options``
    on names in ``options_of`` the callables (classes) that receive them: their keyword parameters join the builder's
    signature (keyword-only, with their defaults), so that ``backbone_options`` and ``help`` see them.
    """

    def wrap(fn):
        if options_of:
            fn.__signature__ = _with_options_of(inspect.signature(fn), options_of)
        _BACKBONES[name] = fn
        return fn

    return wrap


def _with_options_of(own: inspect.Signature, targets: tuple[Callable, ...]) -> inspect.Signature:
    """``own`` without its ``**options``, plus the named keyword parameters of each target it does not have yet."""
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    for target in targets:
        for param in inspect.signature(target).parameters.values():
            named = param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
            if named and all(param.name != p.name for p in params):
                params.append(param.replace(kind=param.KEYWORD_ONLY))
    return own.replace(parameters=params)


def available_backbones() -> list[str]:
    _import_all()
    return sorted(_BACKBONES)


def _builder(name: str) -> Callable[..., nn.Module]:
    _import_all()
    if name not in _BACKBONES:
        raise ValueError(f"predictor.backbone '{name}' is unknown (expected one of {sorted(_BACKBONES)})")
    return _BACKBONES[name]


def backbone_options(name: str) -> tuple[str, ...]:
    """The option names that backbone ``name`` takes (its builder's parameters after dim, depth, num_heads), e.g. to
    pass exactly those from a config section that holds every backbone's options."""
    params = inspect.signature(_builder(name)).parameters.values()
    return tuple(p.name for p in params if p.name not in _POSITIONAL and p.kind is not p.VAR_KEYWORD)


def build_backbone(name: str, dim: int, depth: int, num_heads: int, **options) -> nn.Module:
    """Build backbone ``name`` (``transformer`` | ``mamba3`` | ``hybrid``) with ``options`` among
    ``backbone_options(name)``; an option it does not take raises ValueError naming it."""
    taken = backbone_options(name)
    unknown = [key for key in options if key not in taken]
    if unknown:
        raise ValueError(f"predictor backbone '{name}' takes no option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(key) for key in unknown)} (its options: {', '.join(taken)})")
    return _builder(name)(dim=dim, depth=depth, num_heads=num_heads, **options)


_BACKBONE_MODULES = ("transformer", "mamba3", "hybrid")  # each module registers its builders on import


def _import_all() -> None:
    import importlib

    for module in _BACKBONE_MODULES:
        importlib.import_module(f"{__name__}.{module}")
