"""JEPA methods as registered parts; the trainer steps any of them without naming their pieces.

A method is one file in this package that registers itself::

    @register_method("ijepa", config=IJEPAConfig, build_encoder=..., encoders={"target": "teacher:target_encoder",
                     "context": "model:context_encoder"}, pipeline="masked_images")
    def build(cfg) -> MethodParts: ...

- ``build(cfg)`` returns the trainable module (what accelerate wraps for DDP/FSDP), its teachers by name (EMA or
  frozen; never wrapped) and the encoder the training monitors read.
- ``model(batch, teachers) -> MethodOutput``: the loss, on-device scalar logs, and features for the collapse monitor.
- ``encoders`` says where each encoder that eval and export may ask for lives in a checkpoint:
  ``teacher:<name>`` (the teacher's own ``<name>.safetensors``) or ``model:<prefix>`` (the ``<prefix>.*`` keys of the
  online ``model.safetensors``); the first entry is the default. ``build_encoder(cfg)`` rebuilds that encoder.
- ``pipeline`` names the data pipeline (``data/pipelines.py``) that builds the method's batches.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..config import ConfigError

DEFAULT_METHOD = "ijepa"


@dataclass
class Teacher:
    """A module the optimizer does not train: an EMA copy of the online submodule ``follows`` (its dotted name in the
    trainable module) or, with ``follows=None``, a frozen module."""

    module: nn.Module
    follows: str | None = None


@dataclass
class MethodParts:
    model: nn.Module  # the trainable module
    teachers: dict[str, Teacher]
    monitor_encoder: nn.Module | None  # what the kNN monitor evaluates (an EMA teacher or an online encoder)
    token_grid: tuple[int, ...]  # the mask samplers' token grid at the training input size (() without masks)
    tokenizer: Callable | None = None  # texts -> {input_ids, attention_mask}, run in the DataLoader workers
    # a frozen module mapping normalised pixels to tokens (B, N, D) whose outputs the pipeline may precompute once
    # (the cached-token path); the method then reads ``batch.tokens`` instead of running it
    input_encoder: nn.Module | None = None


@dataclass
class MethodOutput:
    """loss: scalar; logs: on-device scalars (averaged over an optimizer step, logged as ``train/<key>``);
    features: named (…, D) tensors the collapse monitor tracks (e.g. ``pred``, ``target``)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type
    build: Callable[..., MethodParts]
    build_encoder: Callable[..., nn.Module]
    encoders: dict[str, str]
    pipeline: str

    @property
    def default_encoder(self) -> str:
        return next(iter(self.encoders))


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, config: type, build_encoder: Callable[..., nn.Module], encoders: dict[str, str],
                    pipeline: str):
    """Decorator registering ``build(cfg) -> MethodParts`` as method ``name`` (the config's ``method`` value)."""
    for which, where in encoders.items():
        kind, _, target = where.partition(":")
        if kind not in ("teacher", "model") or not target:
            raise ValueError(f"method '{name}': encoder '{which}' location {where!r} is not 'teacher:<name>' or "
                             f"'model:<prefix>'")

    def wrap(build):
        _METHODS[name] = MethodSpec(name, config, build, build_encoder, dict(encoders), pipeline)
        return build

    return wrap


def _import_all() -> None:
    """Import every module of this package: each method file registers itself, so adding one needs no list."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available_methods() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def get_method(name: str | None) -> MethodSpec:
    """The registered method ``name`` (None: the default); an unknown name lists the registered ones."""
    _import_all()
    name = DEFAULT_METHOD if name is None else name
    if name not in _METHODS:
        raise ConfigError(f"config key 'method' is {name!r}; expected one of the registered methods "
                            f"{sorted(_METHODS)}")
    return _METHODS[name]


def build_method(cfg) -> MethodParts:
    """The parts of ``cfg.method`` built from ``cfg``."""
    return get_method(cfg.method).build(cfg)
