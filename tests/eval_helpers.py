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
    """``output_dir/checkpoint-<step>/`` with model.safetensors, every teacher's <name>.safetensors, config.yaml."""
    cfg = tiny_config(*overrides, output_dir=output_dir)
    torch.manual_seed(seed)
    parts = build_method(cfg)
    perturb_(parts.model, seed + 1)
    for offset, teacher in enumerate(parts.teachers.values(), start=2):
        perturb_(teacher.module, seed + offset)
    ckpt = Path(output_dir) / f"checkpoint-{step:08d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in parts.model.state_dict().items()}, str(ckpt / "model.safetensors"))
    for name, teacher in parts.teachers.items():
        save_file({k: v.contiguous() for k, v in teacher.module.state_dict().items()}, str(ckpt / f"{name}.safetensors"))
    (ckpt / "config.yaml").write_text(to_yaml(cfg))
    (ckpt / "train_state.json").write_text('{"step": %d}' % step)
    return ckpt
