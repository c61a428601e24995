"""Latent-space regression losses on layer-normed target features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Mean over every element of (…, D) predictions vs targets; computed in fp32."""
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":  # the official I-JEPA loss (beta = 1)
        return F.smooth_l1_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"loss.kind '{kind}' is unknown (expected smooth_l1, l1 or l2)")
