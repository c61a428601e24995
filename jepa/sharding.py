"""FSDP2 (``torch.distributed.fsdp.fully_shard``) beside the trainer's EMA teachers, checkpoints and monitors.

Under FSDP every parameter of the online model is a DTensor: each process holds a dim-0 chunk (``Shard(0)``; with
hybrid sharding ``(Replicate(), Shard(0))`` on a 2-D mesh). An EMA teacher is sharded the same way
(``shard_like``: the same mesh, the same FSDP units), so each process updates only its own chunks
(``jepa.ema.ema_update`` on the local tensors: no process ever gathers the full weights for the EMA) and the teacher's
forward all-gathers one unit at a time, as the online model's does. What needs whole tensors gathers them
explicitly, collectively (every process calls, in the same order):
- ``full_state_dict``: the unsharded state of a module on the main process (CPU tensors), one tensor at a time:
  the teacher files of a checkpoint, the monitors' copy;
- ``load_full_state_dict``: a full state (every process read the same file) scattered into the module's shards
  locally, without communication.
Without DTensor parameters (one process, DDP) these reduce to ``state_dict`` / ``load_state_dict``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (the same storage, not a copy, outside autograd); a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def replicated_value(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (no communication); a plain tensor itself. For results every
    process holds whole, e.g. accelerate's gradient norm under FSDP2."""
    if not isinstance(tensor, DTensor):
        return tensor
    if not all(placement.is_replicate() for placement in tensor.placements):
        raise ValueError(f"expected a replicated DTensor, got placements {tensor.placements}")
    return tensor.to_local()


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (FSDP2-sharded)."""
    return any(isinstance(param, DTensor) for param in module.parameters())


TEACHER_FORWARD_METHODS = ("block_outputs",)  # teacher methods run like forward (FSDP gathers the root's weights)


def shard_like(teacher: nn.Module, online: nn.Module, mp_policy=None, offload_policy=None) -> None:
    """``fully_shard`` the teacher in place as ``online`` is sharded: the same device mesh (so every parameter gets
    the online one's placements and local chunk) and the same FSDP units (every submodule name that is an FSDP
    module in ``online``, deepest first, then the teacher itself). Every unit reshards after its forward: a teacher
    never runs backward, so its full weights live only while its forward runs; the EMA then sees only shards.
    The encoder methods a method may call on a teacher instead of ``forward`` (``block_outputs``: multi-layer
    targets) are registered as FSDP forward methods, so they gather the teacher's own weights as ``forward`` does.

    ``mp_policy`` / ``offload_policy``: the online model's (accelerate's FSDP plugin); defaults: none.
    Raises ValueError when ``online`` is not sharded or the two modules differ in layout."""
    from torch.distributed.fsdp import (FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)

    meshes = [param.device_mesh for param in online.parameters() if isinstance(param, DTensor)]
    if not meshes:
        raise ValueError("shard_like: the online module has no DTensor parameters (it is not FSDP2-sharded)")
    check_same_layout(teacher, online)
    options = dict(mesh=meshes[0], reshard_after_forward=True, mp_policy=mp_policy or MixedPrecisionPolicy(),
                   offload_policy=offload_policy or OffloadPolicy())
    units = [name for name, sub in online.named_modules() if name and isinstance(sub, FSDPModule)]
    for name in sorted(units, key=lambda n: n.count("."), reverse=True):
        fully_shard(teacher.get_submodule(name), **options)
    fully_shard(teacher, **options)
    for method in TEACHER_FORWARD_METHODS:
        if hasattr(teacher, method):
            register_fsdp_forward_method(teacher, method)


def check_same_layout(teacher: nn.Module, online: nn.Module) -> None:
    """The two modules have the same parameter names and (global) shapes; ValueError naming the first difference."""
    ours = {name: tuple(p.shape) for name, p in teacher.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in online.named_parameters()}
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(f"teacher and online module differ in parameters (name, shape), e.g. {differ}")


def full_state_dict(module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The unsharded ``state_dict`` of ``module`` as contiguous CPU tensors where ``keep`` (the main process),
    ``{}`` elsewhere (tensors already on the CPU may share storage with the module's). Collective when ``module``
    is sharded: every process must call it. Each DTensor is gathered alone and moved to the host before the next,
    so a process holds at most one full tensor on its device."""
    out = {}
    for key, value in module.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            out[key] = value.detach().cpu().contiguous()
    return out


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) ``state`` into ``module`` strictly; each sharded entry keeps only this process's
    chunk (every process holds the same full state: no communication)."""
    current = module.state_dict()
    converted = {}
    for key, value in state.items():
        target = current.get(key)
        if isinstance(target, DTensor):
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"'{key}' has shape {tuple(value.shape)}, the module expects {tuple(target.shape)}")
            value = distribute_tensor(value.to(target.to_local().device, target.dtype), target.device_mesh,
                                      target.placements, src_data_rank=None)
        converted[key] = value
    module.load_state_dict(converted, strict=True)
