"""Masked latent prediction, the core shared by I-JEPA and V-JEPA: the context encoder sees the context tokens of a
mask set, the predictor predicts the layer-normed features that the EMA target encoder gives at its targets.

One predictor pass per mask set (I-JEPA: one multi-block set; V-JEPA: short- and long-range sets); the loss is the
mean over the sets. batch: ``pixels`` (B, C, H, W) or (B, C, T, H, W) and ``masks`` (one ``MaskBatch`` per set).

Options (LeJEPA's argument, arXiv 2511.08544: SIGReg makes EMA and stop-gradient unnecessary):
- ``sigreg``: + λ · SIGReg on the context encoder's embeddings (each image's mean-pooled context tokens, or every
  real context token) and/or on the online targets' (``sigreg_on``);
- ``target_source='online'``: the targets are the online (context) encoder's layer-normed features of the whole
  image, with or without gradient (``target_stop_grad``); the EMA teacher then only serves eval and export.

V-JEPA 2.1's dense-feature options (Mur-Labadia et al., arXiv 2603.14482; all off by default, where the loss, the
parameters and the state dict are exactly the plain method's):
- context loss (``context_weight`` λ > 0): the predictor also outputs predictions at the context positions of each
  target sequence (its own output projection ``predictor.context_proj``), regressed onto the (layer-normed) targets
  of those context tokens with the same ``loss_kind``: loss = prediction + λ(s) · context, per mask set. λ(s) is 0
  for ``context_start_step`` optimizer steps, then rises linearly to λ over ``context_warmup_steps`` and stays
  (``jepa.schedules.LinearRampWeight``; its call count is a buffer of the model, so resume continues it exactly).
- ``context_distance_weighting``: each context token's loss is scaled by ``1 / sqrt(d / context_distance_scale)``,
  ``d`` the Euclidean distance on the token grid (rows, columns; tubelet, row, column for video; in tokens) to the
  nearest real target token of its sequence, at least 1; the mean stays over the real context tokens
  (``context_distance_weights``). This is the official V-JEPA 2.1 code's weighting (the paper's
  λ_i = λ / sqrt(d_min)); ``context_distance_scale`` is its optional grid-size normalisation (it divides by
  ``grid side // 16``).
- multi-layer targets (``target_blocks``: k block indices of the target encoder): the targets are the outputs of
  those blocks, each through the encoder's final norm and then layer-normed on its own, concatenated to (…, k·D);
  the predictor projects to k·D. V-JEPA 2.1 concatenates k = 4 evenly spaced levels (its deep self-supervision);
  its multi-level *context* input to the predictor (an MLP fusing the context encoder's levels) is not done here:
  the predictor reads the context encoder's last layer as before.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders.vit import gather_tokens
from predictors.ijepa import JEPAPredictor

from ..losses import SIGReg, latent_loss, variance_covariance
from ..schedules import LinearRampWeight
from . import MethodOutput


def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std across all tokens of (…, D) features."""
    return features.detach().float().reshape(-1, features.shape[-1]).std(0).mean()


def masked_mean(tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens, (B, N) padding -> (B, D) mean over the real tokens."""
    keep = (~padding).unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(1) / keep.sum(1)


def grid_coordinates(idx: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """(…) long flat indices in raster order on ``grid`` -> (…, len(grid)) fp32 coordinates, leading axis first
    ((row, column) on an image grid, (tubelet, row, column) on a video grid)."""
    coordinates = []
    for size in reversed(grid):
        coordinates.append(idx % size)
        idx = torch.div(idx, size, rounding_mode="floor")
    return torch.stack(coordinates[::-1], -1).float()


@torch.no_grad()
def context_distance_weights(context_idx: torch.Tensor, target_idx: torch.Tensor, target_pad: torch.Tensor | None,
                             grid: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    """V-JEPA 2.1's context-loss weights, (B, n, Nc): ``1 / sqrt(d / scale)`` for each context token of
    ``context_idx`` (B, Nc) and each target sequence k of ``target_idx`` (B, n, Nt), ``d`` the Euclidean distance on
    ``grid`` (in tokens, every axis alike) to the nearest real target token of sequence k (``target_pad`` (B, n, Nt)
    True at padding, which is never nearest), at least 1 (a context token on a target position counts as a
    neighbour). Vectorised: one ``torch.cdist`` over (B·n, Nc, Nt), exact (no matmul expansion); a row with no real
    target gets weight 0. The weights of padding context entries are meaningless (the loss masks them)."""
    batch, num_targets, target_len = target_idx.shape
    context = grid_coordinates(context_idx, grid)  # (B, Nc, r)
    context = context.unsqueeze(1).expand(-1, num_targets, -1, -1).reshape(batch * num_targets, -1, len(grid))
    targets = grid_coordinates(target_idx.reshape(batch * num_targets, target_len), grid)  # (B*n, Nt, r)
    distance = torch.cdist(context, targets, compute_mode="donot_use_mm_for_euclid_dist")  # (B*n, Nc, Nt)
    if target_pad is not None:
        distance = distance.masked_fill(target_pad.reshape(batch * num_targets, 1, target_len), float("inf"))
    nearest = distance.amin(-1).clamp_min(1.0)
    return (nearest / scale).rsqrt().reshape(batch, num_targets, -1)


class LatentPrediction(nn.Module):
    """forward(batch, teachers) -> MethodOutput; ``teachers['target_encoder']`` gives the targets.

    ``mask_names``: one name per mask set of the batch; logs of set ``name`` get the suffix ``/name`` (none for a
    single unnamed set, I-JEPA's). ``variance_weight`` / ``covariance_weight``: C-JEPA-style VICReg terms on each
    sample's mean-pooled context embedding. ``sigreg`` (a ``jepa.losses.SIGReg``, with ``sigreg_weight`` λ):
    SIGReg on ``sigreg_on`` = context | target | both embeddings, mean-pooled per image or, with
    ``sigreg_tokens``, every real token. ``target_source``: ema (the teacher ``target_encoder``) | online (the
    context encoder on the whole image; ``target_stop_grad`` detaches it).

    V-JEPA 2.1 (module docstring): ``context_weight`` λ > 0 adds the context loss, ramped by ``context_start_step``
    / ``context_warmup_steps`` optimizer steps of ``calls_per_step`` forward calls each (the trainer's
    ``grad_accum_steps``), needs a predictor with ``context_head``; ``context_distance_weighting`` /
    ``context_distance_scale`` weight it by the distance to the targets; ``target_blocks`` (ascending block indices,
    None: the encoder's output) gives multi-layer targets (the predictor's ``out_dim`` must be k·D).
    """

    def __init__(self, encoder: nn.Module, predictor: JEPAPredictor, loss_kind: str = "smooth_l1",
                 variance_weight: float = 0.0, covariance_weight: float = 0.0, mask_names: tuple[str, ...] = ("",),
                 sigreg: SIGReg | None = None, sigreg_weight: float = 0.0, sigreg_on: str = "context",
                 sigreg_tokens: bool = False, target_source: str = "ema", target_stop_grad: bool = True,
                 context_weight: float = 0.0, context_warmup_steps: int = 0, context_start_step: int = 0,
                 context_distance_weighting: bool = False, context_distance_scale: float = 1.0,
                 target_blocks: tuple[int, ...] | None = None, calls_per_step: int = 1):
        super().__init__()
        self.context_encoder = encoder
        self.predictor = predictor
        self.loss_kind = loss_kind
        self.variance_weight, self.covariance_weight = variance_weight, covariance_weight
        self.mask_names = tuple(mask_names)
        if sigreg_on not in ("context", "target", "both") or target_source not in ("ema", "online"):
            raise ValueError(f"sigreg_on '{sigreg_on}' / target_source '{target_source}' unknown (expected context | "
                             f"target | both, ema | online)")
        if sigreg_on != "context" and (target_source != "online" or target_stop_grad):
            raise ValueError(f"sigreg_on '{sigreg_on}' needs targets that train: target_source='online' with "
                             f"target_stop_grad=False")
        if sigreg is not None:  # registered only when used: the state dict of a plain I-JEPA is unchanged
            self.sigreg = sigreg
        self.sigreg_weight = sigreg_weight if sigreg is not None else 0.0
        self.sigreg_on, self.sigreg_tokens = sigreg_on, sigreg_tokens
        self.target_source, self.target_stop_grad = target_source, target_stop_grad
        if context_weight > 0:  # registered only when used: the plain state dict is unchanged
            if not hasattr(predictor, "context_proj"):
                raise ValueError("context_weight > 0 needs a predictor built with context_head=True")
            self.context_ramp = LinearRampWeight(context_weight, context_warmup_steps, context_start_step,
                                                 calls_per_step)
        elif context_distance_weighting:
            raise ValueError("context_distance_weighting weights the context loss: it needs context_weight > 0")
        if not context_distance_scale > 0:
            raise ValueError(f"context_distance_scale {context_distance_scale} must be > 0")
        self.context_distance_weighting = context_distance_weighting
        self.context_distance_scale = context_distance_scale
        self.target_blocks = None if target_blocks is None else tuple(int(i) for i in target_blocks)
        if self.target_blocks is not None and not hasattr(encoder, "block_outputs"):
            raise ValueError(f"multi-layer targets need an encoder with block_outputs (the ViTs); "
                             f"{type(encoder).__name__} has none")

    def encode_targets(self, encoder: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer-normed targets (B, N, D) — or (B, N, k·D), the k ``target_blocks`` each layer-normed and
        concatenated, oldest first —, the encoder's output (B, N, D) before that layer norm)."""
        if self.target_blocks is None:
            raw = encoder(pixels)
            return F.layer_norm(raw, raw.shape[-1:]), raw
        levels = encoder.block_outputs(pixels, self.target_blocks)
        return torch.cat([F.layer_norm(level, level.shape[-1:]) for level in levels], -1), levels[-1]

    @torch.no_grad()
    def target_features(self, target_encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, D) (k·D with multi-layer targets) layer-normed target-encoder features of every token."""
        return self.encode_targets(target_encoder, pixels)[0]

    def targets(self, teachers: dict[str, nn.Module], pixels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(layer-normed targets (B, N, D or k·D), the online encoder's raw features (B, N, D) or None with EMA
        targets)."""
        if self.target_source == "ema":
            return self.target_features(teachers["target_encoder"], pixels), None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.target_stop_grad):
            return self.encode_targets(self.context_encoder, pixels)

    def context_loss(self, context_pred: torch.Tensor, features: torch.Tensor, masks, grid: tuple[int, ...]
                     ) -> torch.Tensor:
        """The context loss of one mask set: ``context_pred`` (B, n, Nc, D') against the targets ``features``
        (B, N, D') at the context positions, padding context tokens excluded, distance-weighted if asked."""
        num_targets = masks.target_idx.shape[1]
        target = gather_tokens(features, masks.context_idx).unsqueeze(1).expand(-1, num_targets, -1, -1)
        padding = masks.context_attention_pad
        if padding is not None:
            padding = padding.unsqueeze(1).expand(-1, num_targets, -1)
        weights = None
        if self.context_distance_weighting:
            weights = context_distance_weights(masks.context_idx, masks.target_idx, masks.target_attention_pad, grid,
                                               self.context_distance_scale)
        return latent_loss(context_pred, target, self.loss_kind, padding, weights)

    def sigreg_term(self, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """SIGReg of (B, N, D) tokens (``padding`` (B, N) True at padded ones): of each image's mean-pooled
        embedding, or of every real token with ``sigreg_tokens``."""
        if not self.sigreg_tokens:
            return self.sigreg(tokens.mean(1) if padding is None else masked_mean(tokens, padding))
        keep = None if padding is None else (~padding).flatten()
        return self.sigreg(tokens.flatten(0, 1), keep)

    def forward(self, batch, teachers: dict[str, nn.Module]) -> MethodOutput:
        pixels = batch.pixels
        if len(batch.masks) != len(self.mask_names):
            raise ValueError(f"batch has {len(batch.masks)} mask sets, the method expects {len(self.mask_names)} "
                             f"({list(self.mask_names)})")
        features, online_raw = self.targets(teachers, pixels)
        grid = self.context_encoder.token_grid(pixels.shape[1:])
        context_weight = self.context_ramp() if hasattr(self, "context_ramp") else None  # advances once per call
        losses, logs, preds, targets = [], {}, [], []
        sigreg_terms, pooled_context = [], []
        for name, masks in zip(self.mask_names, batch.masks):
            batch_size, num_targets, target_len = masks.target_idx.shape
            target = gather_tokens(features, masks.target_idx.reshape(batch_size, -1))
            target = target.reshape(batch_size, num_targets, target_len, -1)
            # attention masks only where something is padded: unmasked SDPA takes its flash path
            context_pad = masks.context_attention_pad
            context = self.context_encoder(pixels, masks.context_idx, context_pad)
            if context_weight is None:
                pred = self.predictor(context, masks.context_idx, context_pad, masks.target_idx, grid,
                                      masks.target_attention_pad)
            else:
                pred, context_pred = self.predictor(context, masks.context_idx, context_pad, masks.target_idx, grid,
                                                    masks.target_attention_pad, return_context=True)
            prediction_loss = latent_loss(pred, target, self.loss_kind, masks.target_pad)
            loss, suffix = prediction_loss, f"/{name}" if name else ""
            if context_weight is not None:
                context_loss = self.context_loss(context_pred, features, masks, grid)
                loss = loss + context_weight * context_loss
                logs[f"context_loss{suffix}"] = context_loss.detach()
            if self.variance_weight or self.covariance_weight:
                variance, covariance = variance_covariance(masked_mean(context, masks.context_pad))
                loss = loss + self.variance_weight * variance + self.covariance_weight * covariance
                logs.update({f"variance_loss{suffix}": variance.detach(), f"covariance_loss{suffix}": covariance.detach()})
            if self.sigreg_weight and self.sigreg_on != "target":
                sigreg_terms.append(self.sigreg_term(context, masks.context_pad))
                pooled_context.append(masked_mean(context.detach(), masks.context_pad))
            real_targets = (masks.target_idx[0].numel() if masks.target_pad is None
                            else (~masks.target_pad).sum((1, 2)).float().mean())
            logs.update({
                f"prediction_loss{suffix}": prediction_loss.detach(),
                f"context_tokens{suffix}": (~masks.context_pad).sum(1).float().mean(),
                f"target_tokens{suffix}": torch.as_tensor(real_targets, dtype=torch.float32, device=pixels.device),
            })
            losses.append(loss)
            keep = None if masks.target_pad is None else ~masks.target_pad
            preds.append(pred.detach() if keep is None else pred.detach()[keep])
            targets.append((target if keep is None else target[keep]).detach())  # online targets may carry grad
        pred_all = torch.cat([p.reshape(-1, p.shape[-1]) for p in preds])
        target_all = torch.cat([t.reshape(-1, t.shape[-1]) for t in targets])
        logs.update(pred_std=feature_std(pred_all), target_std=feature_std(target_all))
        if context_weight is not None:
            logs["context_weight"] = context_weight
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        monitored = {"pred": pred_all, "target": target_all}
        if self.sigreg_weight:
            if self.sigreg_on != "context":
                sigreg_terms.append(self.sigreg_term(online_raw, None))
            regularizer = torch.stack(sigreg_terms).mean()
            loss = loss + self.sigreg_weight * regularizer
            logs["sigreg"] = regularizer.detach()
            if pooled_context:  # what the kNN monitor sees: each image's mean embedding
                monitored["context"] = torch.cat(pooled_context)
        return MethodOutput(loss, logs, monitored)
