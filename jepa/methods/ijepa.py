"""I-JEPA (Assran et al., 2023): the context encoder sees the context tokens, the predictor predicts the layer-normed
features that the EMA target encoder gives at every target block (``latent_prediction.LatentPrediction`` with one
multi-block mask set).

batch: ``pixels`` (B, C, H, W) and ``masks[0]`` with ``context_idx`` / ``context_pad`` (B, Nc) and ``target_idx``
(B, n, Nt) on the encoder's token grid.

I-JEPA masks + SIGReg: ``loss.sigreg_weight`` > 0 adds λ · SIGReg (``sigreg`` section) on the context encoder's
embeddings (``loss.sigreg_on``, ``loss.sigreg_tokens``); ``loss.target_source=online`` takes the targets from the
online encoder itself (``loss.target_stop_grad``) instead of the EMA teacher, which then only follows for eval and
export (``optim.ema_start=ema_end=0`` makes it an exact copy of the online encoder).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn

from encoders.registry import build_encoder, encoder_options
from predictors.backbones import backbone_options
from predictors.ijepa import JEPAPredictor

from ..config import ConfigError, knob
from ..losses import SIGReg
from ..sections import LossConfig, MaskConfig, ModelConfig, PredictorConfig, SIGRegConfig, TrainConfig
from . import MethodParts, Teacher, register_method
from .latent_prediction import LatentPrediction


@dataclass
class IJEPALossConfig(LossConfig):
    sigreg_weight: float = knob(0.0, ge=0)  # λ: loss = prediction + λ SIGReg (0: off, the official I-JEPA)
    sigreg_on: Literal["context", "target", "both"] = "context"  # target / both: online targets with gradient
    sigreg_tokens: bool = False  # False: each image's mean-pooled embedding; True: every real token
    target_source: Literal["ema", "online"] = "ema"  # online: the context encoder on the whole image
    target_stop_grad: bool = True  # online targets: no gradient through them

    def check(self, prefix: str) -> None:
        if self.target_source == "ema" and not self.target_stop_grad:
            raise ConfigError(f"config key '{prefix}target_stop_grad' is false but {prefix}target_source is 'ema' "
                              f"(EMA targets never carry a gradient; set {prefix}target_source=online)")
        if self.sigreg_on != "context" and (self.target_source != "online" or self.target_stop_grad):
            raise ConfigError(f"config key '{prefix}sigreg_on' is '{self.sigreg_on}' but the targets do not train "
                              f"(needs {prefix}target_source=online and {prefix}target_stop_grad=false)")


@dataclass
class IJEPAConfig(TrainConfig):
    method: str = "ijepa"
    model: ModelConfig = field(default_factory=ModelConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    loss: IJEPALossConfig = field(default_factory=IJEPALossConfig)
    sigreg: SIGRegConfig = field(default_factory=SIGRegConfig)  # read when loss.sigreg_weight > 0

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


def latent_prediction_options(cfg) -> dict:
    """The SIGReg / online-target options of a latent-prediction config (none in a schema without them: V-JEPA)."""
    loss = cfg.loss
    options = {name: getattr(loss, name) for name in ("sigreg_weight", "sigreg_on", "sigreg_tokens", "target_source",
                                                      "target_stop_grad") if hasattr(loss, name)}
    if options.get("sigreg_weight", 0) > 0:
        s = cfg.sigreg
        options["sigreg"] = SIGReg(s.num_slices, s.num_points, s.t_max, s.half_line, s.gather, seed=cfg.trainer.seed)
    return options


def build_latent_prediction(cfg, input_shape: tuple[int, ...], mask_names: tuple[str, ...]) -> MethodParts:
    """Context encoder + predictor (trained) and the EMA target encoder that follows the context encoder (with
    online targets the monitor reads the context encoder, the one the loss trains)."""
    encoder = build_vision_encoder(cfg)
    options = latent_prediction_options(cfg)
    method = LatentPrediction(encoder, build_predictor(cfg, encoder.embed_dim), cfg.loss.kind,
                              cfg.loss.variance_weight, cfg.loss.covariance_weight, mask_names, **options)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    monitor = encoder if options.get("target_source") == "online" else target_encoder
    return MethodParts(method, {"target_encoder": Teacher(target_encoder, follows="context_encoder")},
                       monitor_encoder=monitor, token_grid=encoder.token_grid(input_shape))
