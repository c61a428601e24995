"""Whole training state on disk, written atomically, loaded without pickle code execution.

A checkpoint folder ``checkpoint-<step:08d>/`` holds accelerate's ``save_state`` output (online model as
safetensors, optimizer, RNG states; accelerate reads these back with ``torch.load(weights_only=True)``) plus:
- ``target_encoder.safetensors``  EMA weights
- ``train_state.json``            step, data position, schedules, monitor results
- ``config.yaml``                 the resolved config
It is written to ``.tmp-checkpoint-<step>`` and renamed when complete, so a crash never leaves a half-written
folder under a checkpoint name.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import Config, load_config, to_dict, to_yaml

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})$")
REQUIRED_FILES = ("train_state.json", "config.yaml", "target_encoder.safetensors", "model.safetensors")
# Config sections/keys that may change between a checkpoint and its resumption.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.output_dir", "trainer.checkpoint_every", "trainer.log_every",
                     "trainer.keep_checkpoints", "trainer.progress_bar", "trainer.compile", "data.root",
                     "data.num_workers", "data.pin_memory", "data.on_corrupt", "monitor.")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not match the current config."""


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(accelerator, output_dir: str | Path, step: int, target_encoder: nn.Module, train_state: dict,
                    cfg: Config, keep: int = 2) -> Path:
    """Write the whole state for ``step``; returns the final folder. Collective: call on every process."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step:08d}"
    tmp = output_dir / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    save_file(rng_state(), str(tmp / f"rng_state_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the rename
    if accelerator.is_main_process:
        state = {k: v.detach().cpu().contiguous() for k, v in target_encoder.state_dict().items()}
        save_file(state, str(tmp / "target_encoder.safetensors"))
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=2))
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (accelerate writes only the main process's)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(path: Path, process_index: int) -> None:
    file = path / f"rng_state_{process_index}.safetensors"
    if not file.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no RNG state for process {process_index} ('{file.name}'); "
                              f"was it written with a different number of processes?")
    state = load_file(str(file))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_compatible(saved: Config, current: Config, path: Path) -> None:
    """Raise CheckpointError listing every config key that differs and may not change on resume."""
    saved_flat, current_flat = _flat(to_dict(saved)), _flat(to_dict(current))
    bad = [
        f"{key}: checkpoint {saved_flat.get(key)!r} vs now {current_flat.get(key)!r}"
        for key in sorted(set(saved_flat) | set(current_flat))
        if saved_flat.get(key) != current_flat.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the current config (start a new trainer.output_dir, or restore "
            f"these values):\n  " + "\n  ".join(bad)
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_checkpoint(accelerator, path: Path, target_encoder: nn.Module, cfg: Config) -> dict:
    """Restore the online model, optimizer, RNG states (through accelerate) and the target encoder; return the
    train state dict. Any missing file, unreadable file or config mismatch raises CheckpointError."""
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' is incomplete: missing {missing}")
    try:
        saved_cfg = load_config(path / "config.yaml")
    except ValueError as err:
        raise CheckpointError(f"checkpoint '{path}' has an unreadable config.yaml: {err}") from err
    check_compatible(saved_cfg, cfg, path)
    try:
        train_state = json.loads((path / "train_state.json").read_text())
        accelerator.load_state(str(path))
        restore_rng_state(path, accelerator.process_index)
        target_state = load_file(str(path / "target_encoder.safetensors"))
        target_encoder.load_state_dict(target_state, strict=True)
    except CheckpointError:
        raise
    except Exception as err:  # corrupt files surface as many exception types; name the checkpoint
        raise CheckpointError(f"checkpoint '{path}' is corrupt or unreadable: {type(err).__name__}: {err}") from err
    return train_state
