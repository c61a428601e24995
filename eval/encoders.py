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

import torch
import torch.nn as nn

from jepa.encoder_spec import EncoderSpecError, resolve_encoder, timm_tokens

__all__ = ["EncoderSpecError", "FrozenEncoder", "load_frozen_encoder", "weights_fingerprint"]


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
    which: str | None = None  # checkpoints: which of the method's encoders (e.g. target, backbone)

    @property
    def is_timm(self) -> bool:
        return self.kind == "timm"

    def to(self, device: torch.device) -> "FrozenEncoder":
        self.module.to(device)
        return self

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) last-layer tokens (timm: ``forward_features`` without prefix tokens)."""
        return timm_tokens(self.module, images) if self.is_timm else self.module(images)

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


def load_frozen_encoder(spec: str, which: str | None = None, timm_seed: int = 0, img_size: int = 0) -> FrozenEncoder:
    """Resolve an ``--encoder`` value (``jepa.encoder_spec``); errors name the value. ``img_size`` (0: the model's
    own) builds timm models that fix their input size (ViTs) at that size."""
    resolved = resolve_encoder(spec, which, timm_seed, img_size)
    if resolved.kind == "random":
        raise EncoderSpecError(f"--encoder '{spec}': random:<encoder> needs an input size; evaluate a random-init "
                               f"architecture with timm:<model name>")
    module = resolved.module
    return FrozenEncoder(module, spec, resolved.kind, resolved.img_size, weights_fingerprint(module), resolved.clip,
                         resolved.which)
