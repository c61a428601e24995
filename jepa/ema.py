"""Exponential moving average of the online encoder into the target encoder."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for every parameter (one fused foreach op).

    Buffers are copied. The two modules must have the same parameter layout.
    """
    target_params = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    if len(target_params) != len(online_params):
        raise ValueError(f"EMA: target has {len(target_params)} parameters, online has {len(online_params)}")
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)
