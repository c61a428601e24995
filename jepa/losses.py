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


def variance_covariance(embeddings: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms of (B, D) embeddings (Bardes et al., 2022).

    variance: mean over dimensions of relu(1 - std); covariance: sum of squared off-diagonal covariances / D.
    Used on image-level context embeddings as in C-JEPA (I-JEPA + VICReg) to keep them from collapsing early.
    """
    z = embeddings.float()
    z = z - z.mean(0)
    std = torch.sqrt(z.var(0) + eps)
    variance = F.relu(1.0 - std).mean()
    cov = (z.T @ z) / max(z.shape[0] - 1, 1)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    covariance = off_diagonal.pow(2).sum() / z.shape[1]
    return variance, covariance
