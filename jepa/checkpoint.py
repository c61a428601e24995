"""Whole training state on disk, written atomically, loaded without pickle code execution.

A checkpoint folder ``checkpoint-<step:08d>/`` holds accelerate's ``save_state`` output (online model as
safetensors, optimizer, RNG states; accelerate reads these back with ``torch.load(weights_only=True)``) plus:
- ``<teacher>.safetensors``       every teacher of the method by name (I-JEPA: ``target_encoder.safetensors``)
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

from .config import flatten, load_config, resumable_keys, to_yaml

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})$")
MARKER_FILES = ("train_state.json", "config.yaml")  # what makes a folder a checkpoint, whatever the method
MODEL_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not match the current config."""


def is_checkpoint_dir(path: str | Path) -> bool:
    """The one definition: a folder holding the marker files (``train_state.json``, ``config.yaml``)."""
    return all((Path(path) / name).is_file() for name in MARKER_FILES)


def find_checkpoint(path: str | Path) -> Path | None:
    """``path`` itself when it is a checkpoint, else the newest complete ``checkpoint-<step>`` inside it."""
    return Path(path) if is_checkpoint_dir(path) else latest_checkpoint(path)


def teacher_file(name: str) -> str:
    return f"{name}.safetensors"


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


def save_checkpoint(accelerator, output_dir: str | Path, step: int, teachers: dict[str, nn.Module],
                    train_state: dict, cfg, keep: int = 2) -> Path:
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
        for name, teacher in teachers.items():
            state = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
            save_file(state, str(tmp / teacher_file(name)))
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


def check_compatible(saved, current, path: Path) -> None:
    """Raise CheckpointError listing every config key that differs and is not declared resumable."""
    saved_flat, current_flat = flatten(saved), flatten(current)
    resumable = resumable_keys(current)
    bad = [
        f"{key}: checkpoint {saved_flat.get(key)!r} vs now {current_flat.get(key)!r}"
        for key in sorted(set(saved_flat) | set(current_flat))
        if saved_flat.get(key) != current_flat.get(key) and key not in resumable
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the current config (start a new trainer.output_dir, or restore "
            f"these values):\n  " + "\n  ".join(bad)
        )


def load_checkpoint(accelerator, path: Path, teachers: dict[str, nn.Module], cfg) -> dict:
    """Restore the online model, optimizer, RNG states (through accelerate) and every teacher; return the train
    state dict. Any missing file, unreadable file or config mismatch raises CheckpointError."""
    required = [*MARKER_FILES, *(teacher_file(name) for name in teachers), MODEL_FILE]
    missing = [name for name in required if not (path / name).is_file()]
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
        for name, teacher in teachers.items():
            teacher.load_state_dict(load_file(str(path / teacher_file(name))), strict=True)
    except CheckpointError:
        raise
    except Exception as err:  # corrupt files surface as many exception types; name the checkpoint
        raise CheckpointError(f"checkpoint '{path}' is corrupt or unreadable: {type(err).__name__}: {err}") from err
    return train_state
