"""I-JEPA (Assran et al., 2023): the context encoder sees the context tokens, the predictor predicts the layer-normed
features that the EMA target encoder gives at every target block.

batch: ``pixels`` (B, C, H, W) — or (B, C, T, H, W) with a video encoder — and ``masks[0]`` with ``context_idx`` /
``context_pad`` (B, Nc) and ``target_idx`` (B, n, Nt) on the encoder's token grid.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders.registry import build_encoder, encoder_options
from encoders.vit import gather_tokens
from predictors.backbones import backbone_options
from predictors.ijepa import JEPAPredictor

from ..config import ConfigError
from ..losses import latent_loss, variance_covariance
from ..sections import LossConfig, MaskConfig, ModelConfig, PredictorConfig, TrainConfig
from . import MethodOutput, MethodParts, Teacher, register_method


@dataclass
class IJEPAConfig(TrainConfig):
    method: str = "ijepa"
    model: ModelConfig = field(default_factory=ModelConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def check(self, prefix: str) -> None:
        check_patch_divides(self)


def check_patch_divides(cfg) -> None:
    """``data.img_size`` must be a whole number of ViT patches (a CNN crops to its stride itself)."""
    if cfg.data.img_size % cfg.model.patch_size and not cfg.model.encoder.startswith("cnn:"):
        raise ConfigError(f"config key 'data.img_size' ({cfg.data.img_size}) must be divisible by model.patch_size "
                          f"({cfg.model.patch_size})")


def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std across all tokens of (…, D) features."""
    return features.detach().float().reshape(-1, features.shape[-1]).std(0).mean()


class IJEPA(nn.Module):
    """forward(batch, teachers) -> MethodOutput; ``teachers['target_encoder']`` gives the targets."""

    def __init__(self, encoder: nn.Module, predictor: JEPAPredictor, loss_kind: str = "smooth_l1",
                 variance_weight: float = 0.0, covariance_weight: float = 0.0):
        super().__init__()
        self.context_encoder = encoder
        self.predictor = predictor
        self.loss_kind = loss_kind
        self.variance_weight, self.covariance_weight = variance_weight, covariance_weight

    @torch.no_grad()
    def targets(self, target_encoder: nn.Module, pixels: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """(B, n, Nt, D) layer-normed target features at the target blocks."""
        features = target_encoder(pixels)
        features = F.layer_norm(features, features.shape[-1:])
        batch_size, num_targets, target_len = target_idx.shape
        picked = gather_tokens(features, target_idx.reshape(batch_size, -1))
        return picked.reshape(batch_size, num_targets, target_len, -1)

    def forward(self, batch, teachers: dict[str, nn.Module]) -> MethodOutput:
        pixels, masks = batch.pixels, batch.masks[0]
        targets = self.targets(teachers["target_encoder"], pixels, masks.target_idx)
        context = self.context_encoder(pixels, masks.context_idx, masks.context_pad)
        grid = self.context_encoder.token_grid(pixels.shape[1:])
        pred = self.predictor(context, masks.context_idx, masks.context_pad, masks.target_idx, grid)
        prediction_loss = latent_loss(pred, targets, self.loss_kind)
        loss, logs = prediction_loss, {}
        if self.variance_weight or self.covariance_weight:
            keep = (~masks.context_pad).unsqueeze(-1).to(context.dtype)
            pooled = (context * keep).sum(1) / keep.sum(1)  # (B, D) mean over real context tokens
            variance, covariance = variance_covariance(pooled)
            loss = loss + self.variance_weight * variance + self.covariance_weight * covariance
            logs = {"variance_loss": variance.detach(), "covariance_loss": covariance.detach()}
        logs.update(
            prediction_loss=prediction_loss.detach(),
            pred_std=feature_std(pred),
            target_std=feature_std(targets),
            context_tokens=(~masks.context_pad).sum(1).float().mean(),
            target_tokens=torch.tensor(float(masks.target_idx[0].numel()), device=pixels.device),
        )
        return MethodOutput(loss, logs, {"pred": pred.detach(), "target": targets})


def build_vision_encoder(cfg) -> nn.Module:
    """The encoder named by ``cfg.model`` (context encoder, and the architecture of its EMA target)."""
    m = cfg.model
    options = dict(patch_size=m.patch_size, drop_path=m.drop_path, qkv_bias=m.qkv_bias, embed_dim=m.embed_dim,
                   depth=m.depth, num_heads=m.num_heads)
    return build_encoder(m.encoder, **encoder_options(m.encoder, options))


def build_predictor(cfg, embed_dim: int) -> JEPAPredictor:
    p = cfg.predictor
    options = {name: getattr(p, name) for name in backbone_options(p.backbone) if hasattr(p, name)}
    return JEPAPredictor(embed_dim, pred_dim=p.dim, depth=p.depth, num_heads=p.num_heads, backbone=p.backbone,
                         **options)


@register_method("ijepa", config=IJEPAConfig, build_encoder=build_vision_encoder, pipeline="masked_images",
                 encoders={"target": "teacher:target_encoder", "context": "model:context_encoder"})
def build_ijepa(cfg: IJEPAConfig) -> MethodParts:
    encoder = build_vision_encoder(cfg)
    method = IJEPA(encoder, build_predictor(cfg, encoder.embed_dim), cfg.loss.kind, cfg.loss.variance_weight,
                   cfg.loss.covariance_weight)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    grid = encoder.token_grid((3, cfg.data.img_size, cfg.data.img_size))
    return MethodParts(method, {"target_encoder": Teacher(target_encoder, follows="context_encoder")},
                       monitor_encoder=target_encoder, token_grid=grid)
