"""I-JEPA (Assran et al., 2023): the context encoder sees the context tokens, the predictor predicts the layer-normed
features that the EMA target encoder gives at every target block (``latent_prediction.LatentPrediction`` with one
multi-block mask set).

batch: ``pixels`` (B, C, H, W) and ``masks[0]`` with ``context_idx`` / ``context_pad`` (B, Nc) and ``target_idx``
(B, n, Nt) on the encoder's token grid.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.nn as nn

from encoders.registry import build_encoder, encoder_options
from predictors.backbones import backbone_options
from predictors.ijepa import JEPAPredictor

from ..config import ConfigError
from ..sections import LossConfig, MaskConfig, ModelConfig, PredictorConfig, TrainConfig
from . import MethodParts, Teacher, register_method
from .latent_prediction import LatentPrediction


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


def build_vision_encoder(cfg) -> nn.Module:
    """The encoder named by ``cfg.model`` (context encoder, and the architecture of its EMA target); every field of
    the model section is an option of the encoder families that take it."""
    m = cfg.model
    options = {name: getattr(m, name) for name in vars(m) if name != "encoder"}
    return build_encoder(m.encoder, **encoder_options(m.encoder, options))


def build_predictor(cfg, embed_dim: int) -> JEPAPredictor:
    p = cfg.predictor
    options = {name: getattr(p, name) for name in backbone_options(p.backbone) if hasattr(p, name)}
    return JEPAPredictor(embed_dim, pred_dim=p.dim, depth=p.depth, num_heads=p.num_heads, backbone=p.backbone,
                         **options)


@register_method("ijepa", config=IJEPAConfig, build_encoder=build_vision_encoder, pipeline="masked_images",
                 encoders={"target": "teacher:target_encoder", "context": "model:context_encoder"})
def build_ijepa(cfg: IJEPAConfig) -> MethodParts:
    return build_latent_prediction(cfg, (3, cfg.data.img_size, cfg.data.img_size), ("",))


def build_latent_prediction(cfg, input_shape: tuple[int, ...], mask_names: tuple[str, ...]) -> MethodParts:
    """Context encoder + predictor (trained) and the EMA target encoder that follows the context encoder."""
    encoder = build_vision_encoder(cfg)
    method = LatentPrediction(encoder, build_predictor(cfg, encoder.embed_dim), cfg.loss.kind,
                              cfg.loss.variance_weight, cfg.loss.covariance_weight, mask_names)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    return MethodParts(method, {"target_encoder": Teacher(target_encoder, follows="context_encoder")},
                       monitor_encoder=target_encoder, token_grid=encoder.token_grid(input_shape))
