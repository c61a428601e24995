"""JEPA methods: a batch goes in, a loss and on-device logs come out.

A method is the trainable module (what DDP wraps); the EMA target encoder is kept beside it, never wrapped.
    targets = method.targets(target_encoder, batch)    # no grad
    out = method(batch, targets)                       # {'loss': scalar, 'pred_std': ..., ...}
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders.registry import build_encoder
from encoders.vit import gather_tokens
from predictors.ijepa import JEPAPredictor

from .config import Config
from .losses import latent_loss, variance_covariance


def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std across all tokens of (…, D) features."""
    return features.detach().float().reshape(-1, features.shape[-1]).std(0).mean()


class IJEPA(nn.Module):
    """I-JEPA: the context encoder sees the context tokens, the predictor predicts the layer-normed target
    encoder features of every target block.

    batch: ``images`` (B, 3, H, W), ``context_idx`` / ``context_pad`` (B, Nc), ``target_idx`` (B, n, Nt).
    """

    def __init__(self, encoder: nn.Module, predictor: JEPAPredictor, loss_kind: str = "smooth_l1",
                 variance_weight: float = 0.0, covariance_weight: float = 0.0):
        super().__init__()
        self.context_encoder = encoder
        self.predictor = predictor
        self.loss_kind = loss_kind
        self.variance_weight, self.covariance_weight = variance_weight, covariance_weight

    @torch.no_grad()
    def targets(self, target_encoder: nn.Module, batch: dict) -> torch.Tensor:
        """(B, n, Nt, D) layer-normed target features at the target blocks."""
        features = target_encoder(batch["images"])
        features = F.layer_norm(features, features.shape[-1:])
        batch_size, num_targets, target_len = batch["target_idx"].shape
        picked = gather_tokens(features, batch["target_idx"].reshape(batch_size, -1))
        return picked.reshape(batch_size, num_targets, target_len, -1)

    def forward(self, batch: dict, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        images = batch["images"]
        context = self.context_encoder(images, batch["context_idx"], batch["context_pad"])
        grid = self.context_encoder.grid_size(*images.shape[-2:])
        pred = self.predictor(context, batch["context_idx"], batch["context_pad"], batch["target_idx"], grid)
        prediction_loss = latent_loss(pred, targets, self.loss_kind)
        loss = prediction_loss
        logs = {}
        if self.variance_weight or self.covariance_weight:
            keep = (~batch["context_pad"]).unsqueeze(-1).to(context.dtype)
            pooled = (context * keep).sum(1) / keep.sum(1)  # (B, D) mean over real context tokens
            variance, covariance = variance_covariance(pooled)
            loss = loss + self.variance_weight * variance + self.covariance_weight * covariance
            logs = {"variance_loss": variance.detach(), "covariance_loss": covariance.detach()}
        return {
            "loss": loss,
            "prediction_loss": prediction_loss.detach(),
            **logs,
            "pred": pred.detach(),  # kept for the collapse monitor; not summed into the logs
            "pred_std": feature_std(pred),
            "target_std": feature_std(targets),
            "context_tokens": (~batch["context_pad"]).sum(1).float().mean(),
            "target_tokens": torch.tensor(float(batch["target_idx"][0].numel()), device=images.device),
        }


def build_method(cfg: Config) -> tuple[IJEPA, nn.Module]:
    """(trainable method, EMA target encoder initialised as a copy of the context encoder)."""
    m, p = cfg.model, cfg.predictor
    encoder = build_encoder(m.encoder, patch_size=m.patch_size, img_size=m.img_size, drop_path=m.drop_path,
                            qkv_bias=m.qkv_bias, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads)
    predictor = JEPAPredictor(
        encoder.embed_dim, pred_dim=p.dim, depth=p.depth, num_heads=p.num_heads, mlp_ratio=p.mlp_ratio,
        backbone=p.backbone, gated_attention=p.gated_attention, pattern=p.pattern, d_state=p.d_state,
        expand=p.expand, headdim=p.headdim, mimo_rank=p.mimo_rank, bidirectional=p.bidirectional,
    )
    method = IJEPA(encoder, predictor, cfg.loss.kind, cfg.loss.variance_weight, cfg.loss.covariance_weight)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    return method, target_encoder
