"""Exponential moving average of the online encoder into the target encoder."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from .sharding import local


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for every parameter (one fused foreach op).

    Buffers are copied. The two modules must have the same parameter layout. Under FSDP2 both hold DTensor shards
    with the same placements (``jepa.sharding.shard_like``): each process lerps its own chunks, nothing is gathered.
    """
    target_params = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    if len(target_params) != len(online_params):
        raise ValueError(f"EMA: target has {len(target_params)} parameters, online has {len(online_params)}")
    check_same_sharding(target, online)
    torch._foreach_lerp_([local(p) for p in target_params], [local(p) for p in online_params], 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        local(tb).copy_(local(ob))


def check_same_sharding(target: nn.Module, online: nn.Module) -> None:
    """Both parameters of every pair are plain tensors, or DTensors on the same mesh with the same placements and
    local shape; ValueError naming the first pair that differs (e.g. an FSDP model whose teacher was not sharded)."""
    for (name, t), (_, o) in zip(target.named_parameters(), online.named_parameters()):
        if isinstance(t, DTensor) != isinstance(o, DTensor):
            raise ValueError(f"EMA: parameter '{name}' is {'sharded' if isinstance(o, DTensor) else 'whole'} in the "
                             f"online module but {'sharded' if isinstance(t, DTensor) else 'whole'} in the teacher "
                             f"(under FSDP the teacher must be sharded like the online module: "
                             f"jepa.sharding.shard_like)")
        if isinstance(t, DTensor) and (t.device_mesh != o.device_mesh or t.placements != o.placements
                                       or t.to_local().shape != o.to_local().shape):
            raise ValueError(f"EMA: parameter '{name}' is sharded differently in the teacher ({t.placements}, local "
                             f"{tuple(t.to_local().shape)}) and the online module ({o.placements}, local "
                             f"{tuple(o.to_local().shape)})")
