"""Masked latent prediction, the core shared by I-JEPA and V-JEPA: the context encoder sees the context tokens of a
mask set, the predictor predicts the layer-normed features that the EMA target encoder gives at its targets.

One predictor pass per mask set (I-JEPA: one multi-block set; V-JEPA: short- and long-range sets); the loss is the
mean over the sets. batch: ``pixels`` (B, C, H, W) or (B, C, T, H, W) and ``masks`` (one ``MaskBatch`` per set).

Options (LeJEPA's argument, arXiv 2511.08544: SIGReg makes EMA and stop-gradient unnecessary):
- ``sigreg``: + λ · SIGReg on the context encoder's embeddings (each image's mean-pooled context tokens, or every
  real context token) and/or on the online targets' (``sigreg_on``);
- ``target_source='online'``: the targets are the online (context) encoder's layer-normed features of the whole
  image, with or without gradient (``target_stop_grad``); the EMA teacher then only serves eval and export.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders.vit import gather_tokens
from predictors.ijepa import JEPAPredictor

from ..losses import SIGReg, latent_loss, variance_covariance
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
    sample's mean-pooled context embedding. ``sigreg`` (a ``jepa.losses.SIGReg``, with ``sigreg_weight`` λ):
    SIGReg on ``sigreg_on`` = context | target | both embeddings, mean-pooled per image or, with
    ``sigreg_tokens``, every real token. ``target_source``: ema (the teacher ``target_encoder``) | online (the
    context encoder on the whole image; ``target_stop_grad`` detaches it).
    """

    def __init__(self, encoder: nn.Module, predictor: JEPAPredictor, loss_kind: str = "smooth_l1",
                 variance_weight: float = 0.0, covariance_weight: float = 0.0, mask_names: tuple[str, ...] = ("",),
                 sigreg: SIGReg | None = None, sigreg_weight: float = 0.0, sigreg_on: str = "context",
                 sigreg_tokens: bool = False, target_source: str = "ema", target_stop_grad: bool = True):
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

    @torch.no_grad()
    def target_features(self, target_encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, D) layer-normed target-encoder features of every token."""
        features = target_encoder(pixels)
        return F.layer_norm(features, features.shape[-1:])

    def targets(self, teachers: dict[str, nn.Module], pixels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(layer-normed targets (B, N, D), the online encoder's raw features (B, N, D) or None with EMA targets)."""
        if self.target_source == "ema":
            return self.target_features(teachers["target_encoder"], pixels), None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.target_stop_grad):
            raw = self.context_encoder(pixels)
        return F.layer_norm(raw, raw.shape[-1:]), raw

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
        losses, logs, preds, targets = [], {}, [], []
        sigreg_terms, pooled_context = [], []
        for name, masks in zip(self.mask_names, batch.masks):
            batch_size, num_targets, target_len = masks.target_idx.shape
            target = gather_tokens(features, masks.target_idx.reshape(batch_size, -1))
            target = target.reshape(batch_size, num_targets, target_len, -1)
            # attention masks only where something is padded: unmasked SDPA takes its flash path
            context_pad = masks.context_attention_pad
            context = self.context_encoder(pixels, masks.context_idx, context_pad)
            pred = self.predictor(context, masks.context_idx, context_pad, masks.target_idx, grid,
                                  masks.target_attention_pad)
            prediction_loss = latent_loss(pred, target, self.loss_kind, masks.target_pad)
            loss, suffix = prediction_loss, f"/{name}" if name else ""
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
