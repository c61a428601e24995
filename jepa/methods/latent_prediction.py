"""Masked latent prediction, the core shared by I-JEPA and V-JEPA: the context encoder sees the context tokens of a
mask set, the predictor predicts the layer-normed features that the EMA target encoder gives at its targets.

One predictor pass per mask set (I-JEPA: one multi-block set; V-JEPA: short- and long-range sets); the loss is the
mean over the sets. batch: ``pixels`` (B, C, H, W) or (B, C, T, H, W) and ``masks`` (one ``MaskBatch`` per set).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders.vit import gather_tokens
from predictors.ijepa import JEPAPredictor

from ..losses import latent_loss, variance_covariance
from . import MethodOutput


def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std across all tokens of (…, D) features."""
    return features.detach().float().reshape(-1, features.shape[-1]).std(0).mean()


def masked_mean(tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens, (B, N) padding -> (B, D) mean over the real tokens."""
    keep = (~padding).unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(1) / keep.sum(1)


class LatentPrediction(nn.Module):
    """forward(batch, teachers) -> MethodOutput; ``teachers['target_encoder']`` gives the targets.

    ``mask_names``: one name per mask set of the batch; logs of set ``name`` get the suffix ``/name`` (none for a
    single unnamed set, I-JEPA's). ``variance_weight`` / ``covariance_weight``: C-JEPA-style VICReg terms on each
    sample's mean-pooled context embedding.
    """

    def __init__(self, encoder: nn.Module, predictor: JEPAPredictor, loss_kind: str = "smooth_l1",
                 variance_weight: float = 0.0, covariance_weight: float = 0.0, mask_names: tuple[str, ...] = ("",)):
        super().__init__()
        self.context_encoder = encoder
        self.predictor = predictor
        self.loss_kind = loss_kind
        self.variance_weight, self.covariance_weight = variance_weight, covariance_weight
        self.mask_names = tuple(mask_names)

    @torch.no_grad()
    def target_features(self, target_encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, D) layer-normed target-encoder features of every token."""
        features = target_encoder(pixels)
        return F.layer_norm(features, features.shape[-1:])

    def forward(self, batch, teachers: dict[str, nn.Module]) -> MethodOutput:
        pixels = batch.pixels
        if len(batch.masks) != len(self.mask_names):
            raise ValueError(f"batch has {len(batch.masks)} mask sets, the method expects {len(self.mask_names)} "
                             f"({list(self.mask_names)})")
        features = self.target_features(teachers["target_encoder"], pixels)
        grid = self.context_encoder.token_grid(pixels.shape[1:])
        losses, logs, preds, targets = [], {}, [], []
        for name, masks in zip(self.mask_names, batch.masks):
            batch_size, num_targets, target_len = masks.target_idx.shape
            target = gather_tokens(features, masks.target_idx.reshape(batch_size, -1))
            target = target.reshape(batch_size, num_targets, target_len, -1)
            context = self.context_encoder(pixels, masks.context_idx, masks.context_pad)
            pred = self.predictor(context, masks.context_idx, masks.context_pad, masks.target_idx, grid,
                                  masks.target_pad)
            prediction_loss = latent_loss(pred, target, self.loss_kind, masks.target_pad)
            loss, suffix = prediction_loss, f"/{name}" if name else ""
            if self.variance_weight or self.covariance_weight:
                variance, covariance = variance_covariance(masked_mean(context, masks.context_pad))
                loss = loss + self.variance_weight * variance + self.covariance_weight * covariance
                logs.update({f"variance_loss{suffix}": variance.detach(), f"covariance_loss{suffix}": covariance.detach()})
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
            targets.append(target if keep is None else target[keep])
        pred_all = torch.cat([p.reshape(-1, p.shape[-1]) for p in preds])
        target_all = torch.cat([t.reshape(-1, t.shape[-1]) for t in targets])
        logs.update(pred_std=feature_std(pred_all), target_std=feature_std(target_all))
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return MethodOutput(loss, logs, {"pred": pred_all, "target": target_all})
