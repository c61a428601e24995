"""Losses: latent-space regression on layer-normed target features (I-/V-JEPA), VICReg terms, and the VL-JEPA
embedding-space losses (bidirectional InfoNCE with a learnable temperature, cosine, SIGReg)."""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
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


class LogitScale(nn.Module):
    """CLIP's learnable temperature: ``scale = exp(log_scale)`` clamped to ``max_scale``, initialised to
    ``1 / init_temperature``; ``learnable=False`` keeps it a fixed buffer."""

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0):
        super().__init__()
        if not 0 < init_temperature:
            raise ValueError(f"loss.temperature {init_temperature} must be > 0")
        if not 1 / init_temperature <= max_scale:
            raise ValueError(f"loss.temperature {init_temperature} gives scale {1 / init_temperature:.4g} above "
                             f"max_scale {max_scale}")
        log_scale = torch.tensor(math.log(1.0 / init_temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        """0-d scale; the clamp stops the gradient once the scale reaches ``max_scale``, as in CLIP."""
        return self.log_scale.exp().clamp(max=self.max_scale)


def _process_group() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """(B_local, ...) -> (world * B_local, ...) in rank order, differentiable: the backward sums every rank's
    gradient for this rank's rows (reduce-scatter)."""
    import torch.distributed.nn.functional as dist_nn
    with warnings.catch_warnings():
        # deprecated in favour of _functional_collectives, whose autograd variant is still private
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(dist_nn.all_gather(tensor), 0)


def _gather_keys(keys: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, keys.contiguous())
    return torch.cat(parts, 0)


def _soft_cross_entropy(logits: torch.Tensor, row_ids: torch.Tensor, row_keys: torch.Tensor | None,
                        column_keys: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows of CE(logits_i, q_i): q_i is one-hot at ``row_ids[i]`` without keys, otherwise uniform over
    the columns whose key equals the row's key."""
    if row_keys is None:
        return F.cross_entropy(logits, row_ids)
    positive = (row_keys[:, None] == column_keys[None, :]).float()  # (B_local, B); the diagonal is always in it
    return F.cross_entropy(logits, positive / positive.sum(1, keepdim=True))


def info_nce(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor | None = None,
             gather: bool = True) -> torch.Tensor:
    """Bidirectional InfoNCE (CLIP) between (B, D) predictions and targets, L2-normalised here, in fp32.

    logits = scale * pred @ target.T; loss = (CE over rows pred->target + CE over rows target->pred) / 2.
    ``keys`` (B,) long names each target's identity (e.g. the answer string's id): every column with the row's
    key is a positive, the soft target is uniform over them (the cross-entropy then has a floor of
    mean ln(#positives), reached when each row's logits are equal on its positives and -inf elsewhere).
    ``keys=None``: the diagonal is the only positive.

    ``gather=True`` under torch.distributed with world size W > 1: pred, target (and keys) are all-gathered with
    the differentiable all_gather; each rank returns the loss of its own B rows against all W * B columns, so
    the mean of the W losses is the single-process loss on the full batch. The gather's backward sums every
    rank's gradient into the local rows: the gradient a rank sees for its inputs is W times the full-batch
    loss's gradient, and DDP's mean over ranks turns it back into exactly the full-batch gradient.
    Every rank must hold the same B (all_gather needs equal shapes; use drop_last in the loader).
    """
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"info_nce expects pred and target of the same (B, D) shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if keys is not None and keys.shape != pred.shape[:1]:
        raise ValueError(f"info_nce keys must have shape ({pred.shape[0]},), got {tuple(keys.shape)}")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred = F.normalize(pred.float(), dim=-1)
        target = F.normalize(target.float(), dim=-1)
        rank, world = _process_group() if gather else (0, 1)
        all_pred, all_target, all_keys = pred, target, keys
        if world > 1:
            all_pred, all_target = _gather(pred), _gather(target)
            all_keys = None if keys is None else _gather_keys(keys)
        scale = scale.float()
        row_ids = rank * pred.shape[0] + torch.arange(pred.shape[0], device=pred.device)
        pred_to_target = _soft_cross_entropy(scale * pred @ all_target.T, row_ids, keys, all_keys)
        target_to_pred = _soft_cross_entropy(scale * target @ all_pred.T, row_ids, keys, all_keys)
        return 0.5 * (pred_to_target + target_to_pred)


def cosine_embedding_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(pred, target)) over (…, D) rows, in fp32: 0 for equal directions, 2 for opposite ones."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def sigreg(embeddings: torch.Tensor, num_directions: int = 256, num_points: int = 17, t_max: float = 3.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """SIGReg (LeJEPA, Balestriero & LeCun 2025): distance of (B, D) embeddings from N(0, I), sketched.

    The embeddings are projected on ``num_directions`` random unit directions (drawn with ``generator``, on its
    device: pass a generator seeded identically on every rank so all ranks test the same directions); for each
    1-D projection x the Epps–Pulley statistic
        B * ∫ |φ_emp(t) − exp(−t²/2)|² exp(−t²/2) dt,   φ_emp(t) = mean_b exp(i t x_b),
    is integrated with the trapezoid rule on ``num_points`` points of [−t_max, t_max]; the result is the mean over
    directions. Nothing is standardised: the target is N(0, 1) in every direction. For B samples of N(0, I) its
    expectation is ∫ (1 − exp(−t²)) exp(−t²/2) dt ≈ 1.05 (with the defaults), whatever B.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"sigreg expects (B, D) embeddings, got shape {tuple(embeddings.shape)}")
    if num_points < 2:
        raise ValueError(f"sigreg num_points {num_points} must be >= 2")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        z = embeddings.float()
        device = generator.device if generator is not None else z.device
        directions = torch.randn(z.shape[1], num_directions, generator=generator, device=device).to(z.device)
        directions = directions / directions.norm(dim=0, keepdim=True)
        t = torch.linspace(-t_max, t_max, num_points, device=z.device)
        target_cf = torch.exp(-0.5 * t.square())  # N(0, 1)'s characteristic function, also the weight w(t)
        xt = (z @ directions).unsqueeze(-1) * t  # (B, M, T)
        error = (xt.cos().mean(0) - target_cf).square() + xt.sin().mean(0).square()  # (M, T)
        step = 2 * t_max / (num_points - 1)
        trapezoid = torch.full((num_points,), step, device=z.device)
        trapezoid[[0, -1]] = step / 2
        return z.shape[0] * (error @ (trapezoid * target_cf)).mean()
