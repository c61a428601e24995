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
                padding: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over every element of (…, D) predictions vs targets, computed in fp32; ``padding`` (…) bool, True at
    padded tokens, excludes them (the mean is over real tokens only). ``weights`` (…): each token's loss is scaled
    by its weight, and the mean is still over the real tokens' elements (not normalised by the weights' sum: V-JEPA
    2.1's distance-weighted context loss)."""
    if kind not in _LOSSES:
        raise ValueError(f"loss.kind '{kind}' is unknown (expected smooth_l1, l1 or l2)")
    pred, target = pred.float(), target.float()
    if padding is None and weights is None:
        return _LOSSES[kind](pred, target)
    per_element = _LOSSES[kind](pred, target, reduction="none")
    if weights is not None:
        per_element = per_element * weights.float().unsqueeze(-1)
    if padding is None:
        return per_element.mean()
    keep = (~padding).unsqueeze(-1).float()
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
    ``1 / init_temperature``; ``learnable=False`` keeps it a fixed buffer. ``log_scale`` has shape (1,) (FSDP2 shards
    no 0-d parameter); a 0-d one from an older checkpoint loads into it."""

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0):
        super().__init__()
        if not 0 < init_temperature:
            raise ValueError(f"loss.temperature {init_temperature} must be > 0")
        if not 1 / init_temperature <= max_scale:
            raise ValueError(f"loss.temperature {init_temperature} gives scale {1 / init_temperature:.4g} above "
                             f"max_scale {max_scale}")
        log_scale = torch.tensor([math.log(1.0 / init_temperature)])
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        """0-d scale; the clamp stops the gradient once the scale reaches ``max_scale``, as in CLIP."""
        return self.log_scale.exp().clamp(max=self.max_scale).reshape(())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "log_scale"
        if key in state_dict and state_dict[key].dim() == 0:  # saved when log_scale was 0-d
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over processes (the backward sums the gradients of every rank's copy)."""
    import torch.distributed.nn.functional as dist_nn
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_reduce is deprecated", category=FutureWarning)
        return dist_nn.all_reduce(tensor)


def epps_pulley_knots(num_points: int = 17, t_max: float = 3.0, half_line: bool = True,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (T,), quadrature weights (T,)) for ∫_R f(t) exp(−t²/2) dt ≈ Σ_k weights_k f(t_k) with f even in t.

    ``half_line``: trapezoid on ``num_points`` knots of [0, t_max], doubled (the integrand |φ_N − φ|² is even, so
    this is the same integral at twice the resolution; LeJEPA's released code); else the trapezoid on [−t_max, t_max].
    The Gaussian weight w(t) = exp(−t²/2) is folded into the weights.
    """
    if num_points < 2:
        raise ValueError(f"sigreg num_points {num_points} must be >= 2")
    if not t_max > 0:
        raise ValueError(f"sigreg t_max {t_max} must be > 0")
    low = 0.0 if half_line else -t_max
    t = torch.linspace(low, t_max, num_points, dtype=torch.float32, device=device)
    step = (t_max - low) / (num_points - 1)
    weights = torch.full((num_points,), step * (2.0 if half_line else 1.0), dtype=torch.float32, device=device)
    weights[0] /= 2  # integer indexing: no index tensor to copy to the device
    weights[-1] /= 2
    return t, weights * torch.exp(-0.5 * t.square())


def epps_pulley(samples: torch.Tensor, num_points: int = 17, t_max: float = 3.0, half_line: bool = True,
                gather: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Epps–Pulley statistic of every column of (..., N, M) samples (M 1-D samples of size N) against N(0, 1):

        T = N ∫ |φ_N(t) − φ(t)|² w(t) dt,   φ_N(t) = (1/N) Σ_n exp(i t x_n),   φ(t) = w(t) = exp(−t²/2),

    integrated with ``epps_pulley_knots``; returns (..., M). For N(0, 1) samples E[T] = ∫ (1 − φ²) w dt ≈ 1.06
    whatever N; a collapsed sample (all x_n equal) gives T of order N. Computed in fp32 outside autocast.
    ``mask`` (..., N) bool, True at the rows that count (e.g. real tokens, not padding): the others are left out.

    ``gather=True`` under torch.distributed: the sums Σ_n cos(t x_n), Σ_n sin(t x_n) and N are all-reduced
    (differentiable; one collective), so every rank returns the statistic of the global batch (ranks may hold
    different N). Its backward sums every rank's gradient into the local rows: a rank's gradient is W times the
    global statistic's, which DDP's mean over W ranks turns back into exactly the global gradient.
    """
    with torch.autocast(device_type=samples.device.type, enabled=False):
        x = samples.float()
        t, weights = epps_pulley_knots(num_points, t_max, half_line, x.device)
        xt = x.unsqueeze(-1) * t  # (..., N, M, T)
        cos, sin = xt.cos(), xt.sin()
        if mask is None:
            count = x.new_full(x.shape[:-2], float(x.shape[-2]))  # a fill on the device, no host-to-device copy
        else:
            keep = mask.to(x.dtype)[..., None, None]  # (..., N, 1, 1)
            cos, sin, count = cos * keep, sin * keep, keep.sum((-3, -2, -1))
        cos_sum, sin_sum = cos.sum(-3), sin.sum(-3)  # (..., M, T)
        if gather and _process_group()[1] > 1:
            size, counts = cos_sum.numel(), count.numel()
            packed = _all_reduce_sum(torch.cat([cos_sum.flatten(), sin_sum.flatten(), count.flatten()]))
            cos_sum, sin_sum = packed[:size].view_as(cos_sum), packed[size:2 * size].view_as(sin_sum)
            count = packed[2 * size:2 * size + counts].detach().view_as(count)
        count = count.clamp_min(1)[..., None, None]
        target = torch.exp(-0.5 * t.square())  # N(0, 1)'s characteristic function
        error = (cos_sum / count - target).square() + (sin_sum / count).square()
        return count[..., 0] * (error @ weights)


def random_directions(dim: int, num_directions: int, generator: torch.Generator | None = None,
                      device=None) -> torch.Tensor:
    """(dim, num_directions) columns uniform on the unit sphere, drawn with ``generator`` (on its device)."""
    device = generator.device if generator is not None else device
    directions = torch.randn(dim, num_directions, generator=generator, device=device)
    return directions / directions.norm(dim=0, keepdim=True)


def sigreg(embeddings: torch.Tensor, num_directions: int = 256, num_points: int = 17, t_max: float = 3.0,
           generator: torch.Generator | None = None, half_line: bool = False, gather: bool = False) -> torch.Tensor:
    """SIGReg (LeJEPA, Balestriero & LeCun 2025, arXiv 2511.08544): distance of (B, D) embeddings from N(0, I),
    sketched: the mean over ``num_directions`` random unit directions (drawn with ``generator``, on its device;
    the global RNG without one) of the Epps–Pulley statistic of the 1-D projections (``epps_pulley``).

    Nothing is standardised: the target is N(0, 1) in every direction. The defaults (the trapezoid on
    [−t_max, t_max]) are VL-JEPA's; ``half_line=True`` is LeJEPA's quadrature. For training with fresh slices every
    step, exact on resume and equal on every rank, use the ``SIGReg`` module.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"sigreg expects (B, D) embeddings, got shape {tuple(embeddings.shape)}")
    directions = random_directions(embeddings.shape[1], num_directions, generator, embeddings.device)
    projections = embeddings.float() @ directions.to(embeddings.device)
    return epps_pulley(projections, num_points, t_max, half_line, gather).mean()


class SIGReg(nn.Module):
    """SIGReg with fresh random slices at every training call, reproducible and equal on every rank.

    forward(embeddings (..., B, D)) -> scalar: the Epps–Pulley statistic of each (B, D) set of the leading axes
    (LeJEPA: one per view) along the same ``num_slices`` directions, averaged over sets and directions; with
    ``gather`` the statistics are of the global batch (``epps_pulley``).

    The directions of call ``k`` come from a generator on the embeddings' device seeded by ``(seed, k)``; ``k`` (the
    ``draws`` buffer) advances once per call in training mode. It is part of the model's state dict, so a checkpoint
    restores it and a resumed run draws the same slices as an uninterrupted one; every rank counts the same calls,
    so all ranks test the same directions (which summing their characteristic functions needs). A host-side copy
    of the count avoids reading the buffer back in the training step.
    """

    def __init__(self, num_slices: int = 256, num_points: int = 17, t_max: float = 3.0, half_line: bool = True,
                 gather: bool = True, seed: int = 0):
        super().__init__()
        if num_slices < 1:
            raise ValueError(f"sigreg num_slices {num_slices} must be >= 1")
        epps_pulley_knots(num_points, t_max, half_line)  # check the quadrature arguments now
        self.num_slices, self.num_points, self.t_max = num_slices, num_points, t_max
        self.half_line, self.gather, self.seed = half_line, gather, seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self._draws = 0  # host mirror of ``draws``

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._draws = int(self.draws)  # one read when a checkpoint is loaded, never in the step

    def directions(self, dim: int, device) -> torch.Tensor:
        """(dim, num_slices) unit directions of the current draw."""
        generator = torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + self._draws) % 2**63)
        return random_directions(dim, self.num_slices, generator)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (..., B) bool: rows that count (``epps_pulley``)."""
        if embeddings.dim() < 2:
            raise ValueError(f"SIGReg expects (..., B, D) embeddings, got shape {tuple(embeddings.shape)}")
        directions = self.directions(embeddings.shape[-1], embeddings.device)
        if self.training:
            self._draws += 1
            self.draws.fill_(self._draws)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            projections = embeddings.float() @ directions
        return epps_pulley(projections, self.num_points, self.t_max, self.half_line, self.gather, mask).mean()

    def extra_repr(self) -> str:
        return (f"num_slices={self.num_slices}, num_points={self.num_points}, t_max={self.t_max}, "
                f"half_line={self.half_line}, gather={self.gather}")
