"""Vision encoders named by one string, for evaluation and for methods that start from a trained encoder (VL-JEPA's
X-encoder):

- a training output folder (newest ``checkpoint-<step>``) or a checkpoint folder: the method's encoder ``which``
  (I-JEPA: ``target``, the EMA one, or ``context``);
- an export folder written by ``jepa export`` (safetensors, timm or hf format);
- ``timm:<model name>``: timm's architecture at random init (seeded);
- ``random:<registered encoder>``: one of our encoders (``vit_small``, ``cnn:resnet50``, ...) at random init (seeded),
  the baseline of a trained encoder of the same architecture.

``resolve_encoder(spec) -> ResolvedEncoder``; ``token_module(resolved)`` gives an ``nn.Module`` mapping images to
(B, N, D) final-normed tokens whatever the kind (timm models through ``forward_features`` without prefix tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .export import is_export_path, load_export
from .reader import EncoderReadError, encoder_name, is_checkpoint_path, load_checkpoint_encoder

SPEC_FORMS = "a training checkpoint folder, an export folder, timm:<model name> or random:<encoder name>"


class EncoderSpecError(ValueError):
    """An encoder spec that names nothing loadable; the message names the value."""


@dataclass
class ResolvedEncoder:
    module: nn.Module  # in eval mode, frozen
    kind: str  # checkpoint | export | timm | random
    img_size: int  # default input size (the training data.img_size; timm: its pretrained_cfg; random: 0 = any)
    clip: tuple[int, int] | None  # (frames_per_clip, frame_step) of a video encoder's training data; None: images
    which: str | None = None  # checkpoints: which of the method's encoders was read (the method's default if not asked)


def resolve_encoder(spec: str, which: str | None = None, seed: int = 0, img_size: int = 0,
                    option: str = "--encoder") -> ResolvedEncoder:
    """The encoder ``spec`` names (see the module docstring); errors name ``option`` and the value. ``img_size``
    (0: the model's own) builds timm models that fix their input size (ViTs) at that size."""
    clip = None
    if spec.startswith("timm:"):
        module, img_size = _timm_random(spec[5:], seed, img_size, option)
        kind = "timm"
    elif spec.startswith("random:"):
        module, kind = _ours_random(spec[7:], seed, option), "random"
    else:
        path = Path(spec)
        if not path.exists():
            raise EncoderSpecError(f"{option} '{spec}' is neither an existing folder nor timm:<model name> / "
                                   f"random:<encoder name> (expected {SPEC_FORMS})")
        try:
            if is_export_path(path):
                module, cfg, _ = load_export(path)
                kind = "export"
            elif is_checkpoint_path(path):
                module, cfg, _ = load_checkpoint_encoder(path, which)
                kind = "checkpoint"
                which = encoder_name(cfg, which)
            else:
                raise EncoderSpecError(f"{option} '{spec}' holds no checkpoint-<step>/ folder, no checkpoint files "
                                       f"(target_encoder.safetensors) and no export.json")
        except EncoderReadError as err:  # jepa.export.ExportError included
            raise EncoderSpecError(f"{option} '{spec}': {err}") from err
        img_size = cfg.data.img_size
        if hasattr(cfg.data, "frames_per_clip"):
            clip = (cfg.data.frames_per_clip, cfg.data.frame_step)
    module.eval().requires_grad_(False)
    return ResolvedEncoder(module, kind, img_size, clip, which if kind == "checkpoint" else None)


class TimmTokens(nn.Module):
    """A timm model as a token encoder: forward(images (B, 3, H, W)) -> (B, N, D) from ``forward_features`` (a CNN
    feature map flattened, a ViT's prefix tokens dropped)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embed_dim = model.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return timm_tokens(self.model, images)


def timm_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, D) tokens of a timm model (``forward_features`` without prefix tokens)."""
    out = model.forward_features(images)
    if out.ndim == 4:  # CNN feature map (B, C, h, w)
        return out.flatten(2).transpose(1, 2)
    return out[:, getattr(model, "num_prefix_tokens", 0):]


def token_module(resolved: ResolvedEncoder) -> nn.Module:
    """``resolved.module`` as images -> (B, N, D) tokens, with ``embed_dim``."""
    return TimmTokens(resolved.module) if resolved.kind == "timm" else resolved.module


def _ours_random(name: str, seed: int, option: str) -> nn.Module:
    from encoders.registry import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return build_encoder(name)
        except ValueError as err:
            raise EncoderSpecError(f"{option} 'random:{name}': {err}") from err


def _timm_random(name: str, seed: int, img_size: int, option: str) -> tuple[nn.Module, int]:
    import timm

    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5] if name else []
        hint = f"; similar names: {close}" if close else ""
        raise EncoderSpecError(f"{option} 'timm:{name}' is not a timm model name{hint}")
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
