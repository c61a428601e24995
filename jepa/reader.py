"""The one checkpoint reader of evaluation and export: a training checkpoint's encoder, found through its method.

    encoder, cfg, ckpt = load_checkpoint_encoder("outputs/run", which="target")

The config saved in the checkpoint names the method; the method's spec (``jepa.methods``) says where each encoder
lives (``teacher:<name>`` -> ``<name>.safetensors``, ``model:<prefix>`` -> the ``<prefix>.*`` keys of
``model.safetensors``, or ``pytorch_model_fsdp.bin`` in a checkpoint written under FSDP: accelerate's full state
dict, read with ``torch.load(weights_only=True)``) and rebuilds its architecture from the config. The files read are
verified against the checkpoint's checksums first (``jepa.checkpoint.verify_files``; a checkpoint without checksums
loads with a warning).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .checkpoint import (FSDP_MODEL_FILE, CheckpointError, find_checkpoint, is_checkpoint_dir, model_file,
                         read_saved_config, teacher_file, verify_files)
from .methods import get_method


class EncoderReadError(ValueError):
    """A checkpoint (or export) is missing, incomplete, or does not hold the asked encoder; names the path."""


def is_checkpoint_path(path: str | Path) -> bool:
    """A checkpoint folder or a training output folder holding one."""
    path = Path(path)
    return path.is_dir() and find_checkpoint(path) is not None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest ``checkpoint-<step>`` inside a training output folder."""
    path = Path(path)
    if not path.exists():
        raise EncoderReadError(f"checkpoint path '{path}' does not exist (expected a training output folder or a "
                               f"checkpoint-<step> folder)")
    found = find_checkpoint(path)
    if found is None:
        raise EncoderReadError(f"'{path}' holds no checkpoint (expected checkpoint-<step>/ folders with "
                               f"train_state.json and config.yaml, or such a folder itself)")
    return found


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or accelerate's FSDP full state dict (``pytorch_model_fsdp.bin``: tensors only, loaded
    with ``weights_only=True``, memory-mapped)."""
    if not path.is_file():
        raise EncoderReadError(f"missing weights file '{path}'")
    try:
        if path.name == FSDP_MODEL_FILE:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return load_file(str(path))
    except Exception as err:  # a torn or foreign file surfaces as several exception types
        raise EncoderReadError(f"weights file '{path}' is corrupt or unreadable: {type(err).__name__}: {err}") from err


def load_strict(module: nn.Module, state: dict, where: Path) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise EncoderReadError(f"weights in '{where}' do not match the encoder of its config: missing "
                               f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def read_verified_config(ckpt: Path):
    """The checkpoint's config.yaml, checked against its checksum; EncoderReadError naming the checkpoint."""
    try:
        verify_files(ckpt, ["config.yaml"])
        return read_saved_config(ckpt)
    except CheckpointError as err:
        raise EncoderReadError(str(err)) from err


def verify(ckpt: Path, names: list[str]) -> None:
    """Check ``names`` against the checkpoint's checksums (silently skipped for a checkpoint without checksums: its
    config read already warned)."""
    try:
        verify_files(ckpt, names, warn=False)
    except CheckpointError as err:
        raise EncoderReadError(str(err)) from err


def location_file(ckpt: Path, location: str) -> str:
    """The file of checkpoint ``ckpt`` holding a method's encoder location (``teacher:<name>`` or
    ``model:<prefix>``)."""
    kind, _, name = location.partition(":")
    return teacher_file(name) if kind == "teacher" else model_file(ckpt)


def encoder_state(ckpt: Path, location: str) -> dict[str, torch.Tensor]:
    """The weights at a method's encoder location (``teacher:<name>`` or ``model:<prefix>``)."""
    kind, _, name = location.partition(":")
    if kind == "teacher":
        return read_weights(ckpt / teacher_file(name))
    online = read_weights(ckpt / model_file(ckpt))
    prefix = f"{name}."
    state = {k[len(prefix):]: v for k, v in online.items() if k.startswith(prefix)}
    if not state:
        raise EncoderReadError(f"'{ckpt / model_file(ckpt)}' has no '{prefix}*' keys (found e.g. "
                               f"{sorted(online)[:3]})")
    return state


def encoder_name(cfg, which: str | None = None) -> str:
    """The name of the encoder ``which`` of the training config's method (its default when None), checked."""
    spec = get_method(cfg.method)
    which = which or spec.default_encoder
    if which not in spec.encoders:
        raise EncoderReadError(f"--which '{which}' is not an encoder of method '{spec.name}' (expected one of "
                               f"{list(spec.encoders)})")
    return which


def load_checkpoint_encoder(path: str | Path, which: str | None = None) -> tuple[nn.Module, object, Path]:
    """(encoder in eval mode, its training config, the checkpoint folder used); ``which`` names one of the method's
    encoders (I-JEPA: ``target`` (EMA, the default) or ``context``; ``encoder_name``)."""
    ckpt = resolve_checkpoint(path)
    cfg = read_verified_config(ckpt)
    spec = get_method(cfg.method)
    which = encoder_name(cfg, which)
    verify(ckpt, [location_file(ckpt, spec.encoders[which])])
    encoder = spec.build_encoder(cfg)
    load_strict(encoder, encoder_state(ckpt, spec.encoders[which]), ckpt)
    return encoder.eval(), cfg, ckpt




def load_checkpoint_parts(path: str | Path):
    """(MethodParts with the online model and every teacher loaded, the training config, the checkpoint folder):
    what evaluations of a whole method (VL-JEPA's ``jepa eval vqa``) read. The parts are rebuilt from the saved
    config, so what the config points at (e.g. VL-JEPA's ``vl.x_encoder``) must still resolve."""
    ckpt = resolve_checkpoint(path)
    cfg = read_verified_config(ckpt)
    parts = get_method(cfg.method).build(cfg)
    online = model_file(ckpt)
    verify(ckpt, [online, *(teacher_file(name) for name in parts.teachers)])
    load_strict(parts.model, read_weights(ckpt / online), ckpt / online)
    for name, teacher in parts.teachers.items():
        load_strict(teacher.module, read_weights(ckpt / teacher_file(name)), ckpt / teacher_file(name))
    parts.model.eval()
    return parts, cfg, ckpt
