"""Latent-space regression losses on layer-normed target features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


_LOSSES = {"smooth_l1": F.smooth_l1_loss, "l1": F.l1_loss, "l2": F.mse_loss}  # smooth_l1: official I-JEPA (beta 1)


def latent_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1",
                padding: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over every element of (…, D) predictions vs targets, computed in fp32; ``padding`` (…) bool, True at
    padded tokens, excludes them (the mean is over real tokens only)."""
    if kind not in _LOSSES:
        raise ValueError(f"loss.kind '{kind}' is unknown (expected smooth_l1, l1 or l2)")
    pred, target = pred.float(), target.float()
    if padding is None:
        return _LOSSES[kind](pred, target)
    keep = (~padding).unsqueeze(-1).float()
    per_element = _LOSSES[kind](pred, target, reduction="none")
    return (per_element * keep).sum() / (keep.sum() * pred.shape[-1]).clamp_min(1)


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
