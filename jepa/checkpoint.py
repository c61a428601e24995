"""Whole training state on disk, written atomically, checksummed, loaded without pickle code execution.

A checkpoint folder ``checkpoint-<step:08d>/`` holds accelerate's ``save_state`` output (online model as
safetensors, optimizer, RNG states; accelerate reads these back with ``torch.load(weights_only=True)``) plus:
- ``<teacher>.safetensors``       every teacher of the method by name (I-JEPA: ``target_encoder.safetensors``)
- ``rng_state_<process>.safetensors``  each process's torch RNG states
- ``train_state.json``            step, data position, schedules, monitor results
- ``config.yaml``                 the resolved config
- ``checksums.json``              size and sha256 of every other file, written last
Under FSDP (accelerate's FSDP2 with ``fsdp_state_dict_type: FULL_STATE_DICT``) accelerate writes the online model as
``pytorch_model_fsdp.bin`` (gathered on the main process; read back with ``torch.load(weights_only=True)``) instead of
``model.safetensors``, and the optimizer state gathered whole; the teachers are gathered shard by shard and written as
above, so every file holds whole tensors and the checkpoint reads like any other (``jepa.reader``).
Saving refuses non-finite weights (``NonFiniteWeightsError``), so a checkpoint never holds NaN. The folder is written
as ``.tmp-checkpoint-<step>``, checksummed, flushed to disk and renamed when complete, so a crash never leaves a
half-written folder under a checkpoint name; older checkpoints are deleted only after that (renamed to
``.del-checkpoint-<step>`` first, so a kill during the deletion leaves no half-deleted checkpoint either). Leftover
``.tmp-``/``.del-`` folders are removed at the next start (``remove_stale_folders``). Loading (resume, and
``jepa.reader`` for eval/export) verifies the checksums first; a checkpoint without ``checksums.json`` (written by an
older version) loads with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file

from .config import flatten, load_config, resumable_keys, to_yaml
from .sharding import full_state_dict, load_full_state_dict, local

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})$")
STALE_PATTERN = re.compile(r"^\.(tmp|del)-checkpoint-\d{8}$")  # a save or a deletion cut short
MARKER_FILES = ("train_state.json", "config.yaml")  # what makes a folder a checkpoint, whatever the method
MODEL_FILE = "model.safetensors"
FSDP_MODEL_FILE = "pytorch_model_fsdp.bin"  # accelerate's FSDP full state dict (FSDP_MODEL_NAME); tensors only
MANIFEST_FILE = "checksums.json"
HASH = "sha256"  # ~1 GB/s per thread with SHA-NI: a ViT-B checkpoint (~1.5 GB with the optimizer) in about 1 s
RECOVERY_ADVICE = ("lower optim.lr (and optim.start_lr during warmup) or set optim.grad_clip (e.g. 1.0): these keys "
                   "may change on resume")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not match the current config."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's file is missing, unreadable, or differs from the checksum written with it."""


class NonFiniteWeightsError(FloatingPointError):
    """The weights hold NaN or inf; no checkpoint is written from them."""


def is_checkpoint_dir(path: str | Path) -> bool:
    """The one definition: a folder holding the marker files (``train_state.json``, ``config.yaml``)."""
    return all((Path(path) / name).is_file() for name in MARKER_FILES)


def find_checkpoint(path: str | Path) -> Path | None:
    """``path`` itself when it is a checkpoint, else the newest complete ``checkpoint-<step>`` inside it."""
    return Path(path) if is_checkpoint_dir(path) else latest_checkpoint(path)


def teacher_file(name: str) -> str:
    return f"{name}.safetensors"


def model_file(path: str | Path) -> str:
    """The online model's file in checkpoint ``path``: ``model.safetensors``, or ``pytorch_model_fsdp.bin`` for one
    written under FSDP (``model.safetensors`` when neither exists, so that the error names it)."""
    return FSDP_MODEL_FILE if (Path(path) / FSDP_MODEL_FILE).is_file() and not (Path(path) / MODEL_FILE).is_file() \
        else MODEL_FILE


def uses_fsdp(accelerator) -> bool:
    """Whether ``accelerator`` runs FSDP (its ``save_state`` then writes ``pytorch_model_fsdp.bin``)."""
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


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
                    train_state: dict, cfg, keep: int = 2, model: nn.Module | None = None) -> Path:
    """Write the whole state for ``step``; returns the final folder. Collective: call on every process.
    ``model`` (the unwrapped online model) and every teacher must be finite, else NonFiniteWeightsError and nothing
    is written."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step:08d}"
    tmp = output_dir / f".tmp-checkpoint-{step:08d}"
    check_finite(accelerator, {**({"model": model} if model is not None else {}), **teachers}, step, output_dir)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    save_file(rng_state(), str(tmp / f"rng_state_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the rename
    main = accelerator.is_main_process
    for name, teacher in teachers.items():  # gathered whole under FSDP (collective), one teacher at a time
        state = full_state_dict(teacher, keep=main)
        if main:
            save_file(state, str(tmp / teacher_file(name)))
    if main:
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=2))
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        write_manifest(tmp)  # also flushes every file to disk: the rename must not reach the disk before them
        if final.exists():
            discard_dir(final)
        os.replace(tmp, final)
        _fsync(output_dir)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            if old != final:
                discard_dir(old)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------ finite weights
def nonfinite_tensors(accelerator, modules: dict[str, nn.Module]) -> list[str]:
    """Names (``<module>.<tensor>``) of floating-point parameters and buffers holding NaN or inf, on any process.
    One fused device-side reduction (max-abs per tensor: NaN and inf survive it, and unlike a 2-norm it never
    overflows on large finite weights) and one host sync; the names are gathered only when something is wrong."""
    names, tensors = [], []
    for prefix, module in modules.items():
        for key, value in [*module.named_parameters(), *module.named_buffers()]:
            value = local(value.detach())  # under FSDP this process's shard (maybe empty); the count is reduced
            if value.is_floating_point() and value.numel() > 0:
                names.append(f"{prefix}.{key}")
                tensors.append(value)
    if not tensors and accelerator.num_processes == 1:
        return []
    device = tensors[0].device if tensors else accelerator.device  # a process may hold only empty shards
    maxima = [n.float().to(device) for n in torch._foreach_norm(tensors, ord=math.inf)] if tensors else []
    bad = ~torch.isfinite(torch.stack(maxima)) if maxima else torch.zeros(0, dtype=torch.bool, device=device)
    count = bad.sum()
    if accelerator.num_processes > 1:  # sharded weights (FSDP) differ between processes: all must agree
        count = accelerator.reduce(count, reduction="sum")
    if int(count) == 0:
        return []
    return [name for name, flag in zip(names, bad.tolist()) if flag] or ["(on another process)"]


def check_finite(accelerator, modules: dict[str, nn.Module], step: int, output_dir: Path) -> None:
    """Raise NonFiniteWeightsError (on every process) naming the step, the bad tensors and the last good
    checkpoint when any weight is NaN or inf."""
    bad = nonfinite_tensors(accelerator, modules)
    if bad:
        raise NonFiniteWeightsError(
            f"weights are not finite after step {step} ({len(bad)} tensors, e.g. {bad[:3]}): checkpoint-{step:08d} "
            f"was not written and no checkpoint was deleted. {recovery_hint(output_dir)}")


def recovery_hint(output_dir: Path) -> str:
    """How to get out of a diverged run: the last good checkpoint and the config keys that may change on resume."""
    last = latest_checkpoint(output_dir)
    if last is None:
        return f"No checkpoint was written yet in '{output_dir}': start again with {RECOVERY_ADVICE}."
    return (f"The last good checkpoint is '{last}': run the same command again to resume from it with "
            f"{RECOVERY_ADVICE}.")


# ------------------------------------------------------------------------------------------------ checksums
def file_digest(path: Path) -> str:
    """Streaming sha256 of a file (hashlib releases the GIL: files hash in parallel threads)."""
    digest, buffer = hashlib.new(HASH), bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries: names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest_and_sync(path: Path) -> str:
    digest = file_digest(path)
    _fsync(path)
    return digest


def _parallel(fn, items: list):
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(items)))) as pool:
        return list(pool.map(fn, items))


def write_manifest(folder: Path) -> None:
    """Checksum every file of ``folder`` (subfolders included) into ``checksums.json``, written last; every file is
    flushed to disk on the way."""
    names = sorted(name for name in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                   if name != MANIFEST_FILE)
    digests = _parallel(lambda name: _digest_and_sync(folder / name), names)
    files = {name: {"bytes": (folder / name).stat().st_size, HASH: digest} for name, digest in zip(names, digests)}
    (folder / MANIFEST_FILE).write_text(json.dumps({"algorithm": HASH, "files": files}, indent=1))
    _fsync(folder / MANIFEST_FILE)
    _fsync(folder)


def read_manifest(path: Path) -> dict | None:
    """``{file: {"bytes": n, "sha256": hex}}`` of a checkpoint; None for one written before checksums existed."""
    file = path / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if manifest["algorithm"] != HASH or not all(isinstance(v, dict) and HASH in v and "bytes" in v
                                                    for v in files.values()):
            raise ValueError(f"expected algorithm '{HASH}' and a size and {HASH} per file")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCheckpointError(f"checkpoint '{path}' has an unreadable '{MANIFEST_FILE}': "
                                     f"{type(err).__name__}: {err}") from err
    return files


def verify_files(path: str | Path, names: list[str] | None = None, warn: bool = True) -> bool:
    """Check ``names`` (default: every file the manifest lists) against the checksums written with the checkpoint;
    CorruptCheckpointError naming the file and the checkpoint on any difference. Returns False (logging a warning
    unless ``warn`` is false) for a checkpoint without checksums, which is then not verified."""
    path = Path(path)
    files = read_manifest(path)
    if files is None:
        if warn:
            logger.warning("checkpoint '%s' has no %s (written by an older version): its files are not verified",
                           path, MANIFEST_FILE)
        return False
    names = list(files) if names is None else list(names)
    for name in names:
        if name not in files:
            raise CorruptCheckpointError(f"checkpoint '{path}': '{name}' has no checksum in {MANIFEST_FILE} (the "
                                         f"file was added after the checkpoint was written)")
        if not (path / name).is_file():
            raise CorruptCheckpointError(f"checkpoint '{path}' is incomplete: '{name}' is missing")
        size = (path / name).stat().st_size
        if size != files[name]["bytes"]:
            raise CorruptCheckpointError(f"checkpoint '{path}' is corrupt or unreadable: '{name}' has {size} bytes, "
                                         f"{files[name]['bytes']} were written")
    for name, digest in zip(names, _parallel(lambda n: file_digest(path / n), names)):
        if digest != files[name][HASH]:
            raise CorruptCheckpointError(f"checkpoint '{path}' is corrupt or unreadable: '{name}' does not match "
                                         f"its {HASH} checksum in {MANIFEST_FILE} (changed after the checkpoint "
                                         f"was written)")
    return True


def intact_alternative(ckpt: Path) -> str:
    """A sentence naming the newest older checkpoint beside ``ckpt`` that verifies, and how to resume from it."""
    for older in reversed([p for p in checkpoint_dirs(ckpt.parent) if p.name < ckpt.name]):
        try:
            verified = verify_files(older, warn=False)
        except CheckpointError:
            continue
        state = "intact" if verified else "unverified (written without checksums)"
        return (f"The older checkpoint '{older}' is {state}: to resume from it, move the corrupt one away "
                f"(mv '{ckpt}' '{ckpt.parent / ('corrupt-' + ckpt.name)}') and run again.")
    return (f"No older intact checkpoint is in '{ckpt.parent}': restore '{ckpt.name}' from a copy, or start a new "
            f"trainer.output_dir.")


# ------------------------------------------------------------------------------------------------ folders
def discard_dir(path: Path) -> None:
    """Delete a folder without ever leaving it half-deleted under its own name: rename it to the hidden
    ``.del-<name>`` first (a kill during the deletion leaves that, removed at the next start)."""
    trash = path.with_name(f".del-{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def remove_stale_folders(output_dir: str | Path) -> list[Path]:
    """Remove the ``.tmp-checkpoint-*`` (a save cut short) and ``.del-checkpoint-*`` (a deletion cut short) folders
    of a crashed run; returns them. Main process only, under the run lock (another run's save looks the same)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    stale = sorted(p for p in output_dir.iterdir() if p.is_dir() and STALE_PATTERN.match(p.name))
    for folder in stale:
        logger.warning("removing '%s', left by a run that stopped while %s it", folder,
                       "writing" if folder.name.startswith(".tmp-") else "deleting")
        shutil.rmtree(folder)
    return stale


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
    """Raise CheckpointError listing every config key that differs and is not declared resumable; log a warning
    listing the resumable keys that differ (e.g. a lowered ``optim.lr`` after a divergence)."""
    saved_flat, current_flat = flatten(saved), flatten(current)
    resumable = resumable_keys(current)
    changed = [key for key in sorted(set(saved_flat) | set(current_flat))
               if saved_flat.get(key) != current_flat.get(key)]
    bad = [f"{key}: checkpoint {saved_flat.get(key)!r} vs now {current_flat.get(key)!r}"
           for key in changed if key not in resumable]
    if bad:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the current config (start a new trainer.output_dir, or restore "
            f"these values):\n  " + "\n  ".join(bad)
        )
    if changed:
        logger.warning("resuming from '%s' with changed config: %s", path,
                       ", ".join(f"{key} {saved_flat.get(key)!r} -> {current_flat.get(key)!r}" for key in changed))


def read_saved_config(path: Path):
    """The config saved in checkpoint ``path``; CheckpointError naming the file (and the YAML line) otherwise."""
    file = path / "config.yaml"
    try:
        return load_config(file)
    except (ValueError, yaml.YAMLError) as err:  # ConfigError is a ValueError
        line = _yaml_line(err)
        where = f" (line {line})" if line else ""
        raise CheckpointError(f"checkpoint '{path}' has an unreadable config.yaml '{file}'{where}: {err}") from err


def _yaml_line(err: BaseException) -> int | None:
    """The 1-based line of a YAML syntax error, wherever it sits in the exception chain."""
    while err is not None:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        if mark is not None:
            return mark.line + 1
        err = err.__cause__ or err.__context__
    return None


STATE_COUNTS = ("step", "epoch", "batch_in_epoch")  # required integers >= 0


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_train_state(path: Path, schedule_names=()) -> dict:
    """``train_state.json`` of checkpoint ``path``, validated: ``step``/``epoch``/``batch_in_epoch`` integers >= 0
    (``step`` matching the folder name), ``schedules`` holding ``<name>.current`` for each of ``schedule_names``,
    ``monitors``/``collapse_reference`` mappings when present. CheckpointError naming the file and key otherwise."""
    file = path / "train_state.json"
    try:
        state = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{file}' is not valid JSON (line {err.lineno}): {err.msg}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"'{file}' must hold a JSON object, got {type(state).__name__}")
    for key in STATE_COUNTS:
        if key not in state:
            raise CheckpointError(f"'{file}' has no '{key}' (required: {', '.join(STATE_COUNTS)}, schedules)")
        if not _is_count(state[key]):
            raise CheckpointError(f"'{file}': '{key}' must be an integer >= 0, got {state[key]!r}")
    match = CHECKPOINT_PATTERN.match(path.name)
    if match and int(match.group(1)) != state["step"]:
        raise CheckpointError(f"'{file}': 'step' is {state['step']} but the folder is '{path.name}'")
    schedules = state.get("schedules")
    if not isinstance(schedules, dict):
        raise CheckpointError(f"'{file}': 'schedules' must be a mapping, got {schedules!r}")
    for name in schedule_names:
        entry = schedules.get(name)
        if not isinstance(entry, dict) or not _is_count(entry.get("current")):
            raise CheckpointError(f"'{file}': 'schedules.{name}.current' must be an integer >= 0, got "
                                  f"{entry.get('current') if isinstance(entry, dict) else entry!r}")
    for key in ("monitors", "collapse_reference"):
        if not isinstance(state.get(key, {}), dict):
            raise CheckpointError(f"'{file}': '{key}' must be a mapping, got {state[key]!r}")
    return state


def rng_files(process_index: int) -> list[str]:
    """The RNG state files of one process: accelerate's (python, numpy, torch) and ours (torch, per process)."""
    return [f"random_states_{process_index}.pkl", f"rng_state_{process_index}.safetensors"]


def load_checkpoint(accelerator, path: Path, teachers: dict[str, nn.Module], cfg, schedule_names=()) -> dict:
    """Restore the online model, optimizer, RNG states (through accelerate) and every teacher; return the validated
    train state dict. The files are verified against their checksums first (CorruptCheckpointError); a missing
    file, an unreadable file or a config mismatch raises CheckpointError. A missing RNG state file is an error too:
    without it the run would go on with other data order, masks and drop-path draws, silently inexact."""
    model_name = FSDP_MODEL_FILE if uses_fsdp(accelerator) else MODEL_FILE
    required = [*MARKER_FILES, *(teacher_file(name) for name in teachers), model_name]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        other = MODEL_FILE if model_name == FSDP_MODEL_FILE else FSDP_MODEL_FILE
        hint = (f" (it holds '{other}': it was written {'without' if other == MODEL_FILE else 'under'} FSDP; resume "
                f"it with the accelerate config it was trained with)") if (path / other).is_file() else ""
        raise CorruptCheckpointError(f"checkpoint '{path}' is incomplete: missing {missing}{hint}")
    missing_rng = [name for name in rng_files(accelerator.process_index) if not (path / name).is_file()]
    if missing_rng:
        raise CorruptCheckpointError(
            f"checkpoint '{path}' has no RNG state for process {accelerator.process_index} (missing {missing_rng}); "
            f"exact resume needs it. Was it written with a different number of processes, or was the file removed?")
    verify_files(path)
    saved_cfg = read_saved_config(path)
    check_compatible(saved_cfg, cfg, path)
    train_state = read_train_state(path, schedule_names)
    try:
        accelerator.load_state(str(path))
        restore_rng_state(path, accelerator.process_index)
        for name, teacher in teachers.items():
            load_full_state_dict(teacher, load_file(str(path / teacher_file(name))))
    except CheckpointError:
        raise
    except Exception as err:  # corrupt files surface as many exception types; name the checkpoint
        raise CorruptCheckpointError(f"checkpoint '{path}' is corrupt or unreadable: {type(err).__name__}: "
                                     f"{err}") from err
    return train_state
