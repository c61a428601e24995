"""Frozen encoders from anywhere, behind one interface.

``--encoder`` is one of
- a training output folder (newest ``checkpoint-<step>``) or a checkpoint folder: the target (EMA) encoder, or
  the context encoder with ``which='context'``;
- an export folder written by ``jepa export`` (safetensors, timm or hf format);
- ``timm:<model name>``: timm's architecture at random init (seeded), the baseline of every table.

``FrozenEncoder.tokens(images (B, 3, H, W) or clips (B, 3, T, H, W)) -> (B, N, D)`` final-normed tokens and
``FrozenEncoder.layers(images, k) -> [(B, N_i, D_i)] * k`` the outputs of the last k blocks/stages (our encoders:
the encoder protocol's ``intermediate_layers``; timm: ``forward_intermediates``).
Checkpoints are read by ``jepa.reader`` (through their method), exports by ``jepa.export.load_export``.
A video encoder's ``clip`` is its training clip length and frame step (``data.frames_per_clip``, ``data.frame_step``),
the default clip settings of evaluation on clips. ``fingerprint`` is a SHA-256 of the weights (names, shapes, dtypes, bytes): the encoder part of the cache key.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from jepa.export import is_export_path, load_export
from jepa.reader import EncoderReadError, is_checkpoint_path, load_checkpoint_encoder


class EncoderSpecError(ValueError):
    """An ``--encoder`` value that names nothing loadable; the message names the value."""


def weights_fingerprint(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class FrozenEncoder:
    """A frozen encoder and what evaluation needs to know about it."""

    module: nn.Module
    name: str  # what the user passed (for records)
    kind: str  # checkpoint | export | timm
    img_size: int  # default evaluation resolution (the training data.img_size; timm: its pretrained_cfg)
    fingerprint: str
    clip: tuple[int, int] | None = None  # (frames_per_clip, frame_step) of a video encoder's training data; None: images

    @property
    def is_timm(self) -> bool:
        return self.kind == "timm"

    def to(self, device: torch.device) -> "FrozenEncoder":
        self.module.to(device)
        return self

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) last-layer tokens (timm: ``forward_features`` without prefix tokens)."""
        if not self.is_timm:
            return self.module(images)
        out = self.module.forward_features(images)
        if out.ndim == 4:  # CNN feature map (B, C, h, w)
            return out.flatten(2).transpose(1, 2)
        return out[:, getattr(self.module, "num_prefix_tokens", 0):]

    @torch.no_grad()
    def layers(self, images: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Outputs of the last ``count`` blocks (CNN: stages), oldest first, each (B, N_i, D_i)."""
        if count == 1:
            return [self.tokens(images)]
        if not self.is_timm and hasattr(self.module, "intermediate_layers"):
            return self.module.intermediate_layers(images, count)
        if self.is_timm and hasattr(self.module, "forward_intermediates"):
            maps = self.module.forward_intermediates(images, indices=count, norm=True, intermediates_only=True)
            return [m.flatten(2).transpose(1, 2) for m in maps]
        raise EncoderSpecError(f"encoder '{self.name}' cannot return its last {count} layers "
                               f"(features.layers={count}); use features.layers=1")


def load_frozen_encoder(spec: str, which: str = "target", timm_seed: int = 0, img_size: int = 0) -> FrozenEncoder:
    """Resolve an ``--encoder`` value (see the module docstring); errors name the value. ``img_size`` (0: the
    model's own) builds timm models that fix their input size (ViTs) at that size."""
    clip = None
    if spec.startswith("timm:"):
        module, img_size = _timm_random(spec[5:], timm_seed, img_size)
        kind = "timm"
    else:
        path = Path(spec)
        if not path.exists():
            raise EncoderSpecError(f"--encoder '{spec}' is neither an existing folder nor timm:<model name> "
                                   f"(expected a training checkpoint folder, an export folder, or timm:<name>)")
        try:
            if is_export_path(path):
                module, cfg, _ = load_export(path)
                kind = "export"
            elif is_checkpoint_path(path):
                module, cfg, _ = load_checkpoint_encoder(path, which)
                kind = "checkpoint"
            else:
                raise EncoderSpecError(f"--encoder '{spec}' holds no checkpoint-<step>/ folder, no checkpoint files "
                                       f"(target_encoder.safetensors) and no export.json")
        except EncoderReadError as err:  # jepa.export.ExportError included
            raise EncoderSpecError(f"--encoder '{spec}': {err}") from err
        img_size = cfg.data.img_size
        if hasattr(cfg.data, "frames_per_clip"):
            clip = (cfg.data.frames_per_clip, cfg.data.frame_step)
    module.eval().requires_grad_(False)
    return FrozenEncoder(module, spec, kind, img_size, weights_fingerprint(module), clip)


def _timm_random(name: str, seed: int, img_size: int) -> tuple[nn.Module, int]:
    import timm

    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5] if name else []
        hint = f"; similar names: {close}" if close else ""
        raise EncoderSpecError(f"--encoder 'timm:{name}' is not a timm model name{hint}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = timm.create_model(name, pretrained=False, num_classes=0,
                                       **({"img_size": img_size} if img_size else {}))
        except TypeError:  # the architecture takes no img_size (CNNs run at any size)
            torch.manual_seed(seed)
            module = timm.create_model(name, pretrained=False, num_classes=0)
    if img_size:
        return module, img_size
    return module, int(module.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
