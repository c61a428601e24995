"""Helpers for the eval/export tests: a training checkpoint folder written without training."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from jepa.config import to_yaml
from jepa.methods import build_method

from conftest import tiny_config


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add noise to every parameter (so LayerNorm affines, biases etc. are not at their init values)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))


def make_checkpoint(output_dir: Path, *overrides: str, step: int = 4, seed: int = 0) -> Path:
    """``output_dir/checkpoint-<step>/`` with model.safetensors, target_encoder.safetensors, config.yaml."""
    cfg = tiny_config(*overrides, output_dir=output_dir)
    torch.manual_seed(seed)
    method, target = build_method(cfg)
    perturb_(method, seed + 1)
    perturb_(target, seed + 2)
    ckpt = Path(output_dir) / f"checkpoint-{step:08d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, str(ckpt / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in target.state_dict().items()}, str(ckpt / "target_encoder.safetensors"))
    (ckpt / "config.yaml").write_text(to_yaml(cfg))
    (ckpt / "train_state.json").write_text('{"step": %d}' % step)
    return ckpt
