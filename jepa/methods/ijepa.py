"""I-JEPA (Assran et al., 2023): the context encoder sees the context tokens, the predictor predicts the layer-normed
features that the EMA target encoder gives at every target block (``latent_prediction.LatentPrediction`` with one
multi-block mask set).

batch: ``pixels`` (B, C, H, W) and ``masks[0]`` with ``context_idx`` / ``context_pad`` (B, Nc) and ``target_idx``
(B, n, Nt) on the encoder's token grid.

I-JEPA masks + SIGReg: ``loss.sigreg_weight`` > 0 adds λ · SIGReg (``sigreg`` section) on the context encoder's
embeddings (``loss.sigreg_on``, ``loss.sigreg_tokens``); ``loss.target_source=online`` takes the targets from the
online encoder itself (``loss.target_stop_grad``) instead of the EMA teacher, which then only follows for eval and
export (``optim.ema_start=ema_end=0`` makes it an exact copy of the online encoder).

V-JEPA 2.1's options (arXiv 2603.14482; off by default, shared with V-JEPA; ``latent_prediction`` documents them):
``loss.context_weight`` λ > 0 adds the context loss (predictions at the visible tokens too), ramped from 0 after
``loss.context_start_step`` over ``loss.context_warmup_steps`` optimizer steps; ``loss.context_distance_weighting``
scales each context token's loss by 1/sqrt(its grid distance to the nearest target, / ``loss.context_distance_scale``);
``loss.target_layers`` k > 1 takes the targets from k encoder blocks (``loss.target_layer_spacing``: ``even`` — the
last block of each of k equal spans of the depth, V-JEPA 2.1's levels — or the ``last`` k), each layer-normed and
concatenated (the predictor then outputs k·D).
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
from ..sections import LossConfig, MaskConfig, ModelConfig, PredictorConfig, SIGRegConfig, TrainConfig, vit_size
from . import MethodParts, Teacher, register_method
from .latent_prediction import LatentPrediction


@dataclass
class IJEPALossConfig(LossConfig):
    sigreg_weight: float = knob(0.0, ge=0)  # λ: loss = prediction + λ SIGReg (0: off, the official I-JEPA)
    sigreg_on: Literal["context", "target", "both"] = "context"  # target / both: online targets with gradient
    sigreg_tokens: bool = False  # False: each image's mean-pooled embedding; True: every real token
    target_source: Literal["ema", "online"] = "ema"  # online: the context encoder on the whole image
    target_stop_grad: bool = True  # online targets: no gradient through them
    # V-JEPA 2.1 (arXiv 2603.14482), off by default: the context loss and multi-layer targets
    context_weight: float = knob(0.0, ge=0)  # λ: + λ(s) · loss of the predictions at the context tokens (0: off)
    context_start_step: int = knob(0, ge=0)  # optimizer steps with λ(s) = 0 before the ramp (official: 15000)
    context_warmup_steps: int = knob(0, ge=0)  # linear ramp 0 -> λ over these steps (official: 15000); 0: a jump
    context_distance_weighting: bool = False  # each context token's loss x 1/sqrt(grid distance to nearest target)
    context_distance_scale: float = knob(1.0, gt=0)  # distances divided by this first (official option: grid // 16)
    target_layers: int = knob(1, ge=1)  # k encoder blocks give the targets, each layer-normed, concatenated (k·D)
    target_layer_spacing: Literal["even", "last"] = "even"  # even: V-JEPA 2.1's levels (end of each k-th of depth)

    def check(self, prefix: str) -> None:
        if self.context_weight == 0:
            unused = [name for name, off in (("context_start_step", 0), ("context_warmup_steps", 0),
                                             ("context_distance_weighting", False)) if getattr(self, name) != off]
            if unused:
                raise ConfigError(f"config key '{prefix}{unused[0]}' is set but {prefix}context_weight is 0 (the "
                                  f"context loss is off; set {prefix}context_weight > 0, or leave it unset)")
        if self.context_distance_scale != 1.0 and not self.context_distance_weighting:
            raise ConfigError(f"config key '{prefix}context_distance_scale' is set but "
                              f"{prefix}context_distance_weighting is false (the scale only divides the distances "
                              f"of the distance weighting)")
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
        check_target_layers(self)


def target_blocks(depth: int, count: int, spacing: str) -> tuple[int, ...]:
    """The ascending block indices of ``count`` target layers of a ``depth``-block encoder: ``even``: the last
    block of each of ``count`` equal spans, ``ceil(j * depth / count) - 1`` for j = 1..count (V-JEPA 2.1: depth 12,
    4 levels -> 2, 5, 8, 11; depth 24 -> 5, 11, 17, 23; depth 40 -> 9, 19, 29, 39); ``last``: the last ``count``."""
    if not 1 <= count <= depth:
        raise ValueError(f"target layers: {count} must be in [1, {depth}] (the encoder depth)")
    if spacing == "last":
        return tuple(range(depth - count, depth))
    if spacing != "even":
        raise ValueError(f"target layer spacing '{spacing}' is unknown (expected even | last)")
    return tuple(-(-j * depth // count) - 1 for j in range(1, count + 1))


def check_target_layers(cfg) -> None:
    """``loss.target_layers`` k > 1 needs a ViT (``block_outputs``) at least k blocks deep."""
    k, m = cfg.loss.target_layers, cfg.model
    if k == 1:
        return
    if m.encoder.startswith("cnn:"):
        raise ConfigError(f"config key 'loss.target_layers' is {k} but the encoder {m.encoder} is a CNN (multi-layer "
                          f"targets need the blocks of a ViT encoder; set loss.target_layers=1)")
    size = vit_size(m.encoder)
    depth = m.depth or (size[1] if size else None)
    if depth is not None and k > depth:
        raise ConfigError(f"config key 'loss.target_layers' ({k}) must be <= the encoder depth ({depth}, "
                          f"{'model.depth' if m.depth else m.encoder})")


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
    """The predictor of ``cfg.predictor``; with the V-JEPA 2.1 options of a latent-prediction loss it outputs
    ``loss.target_layers`` x ``embed_dim`` and has a context head (``loss.context_weight`` > 0)."""
    p, loss = cfg.predictor, cfg.loss
    options = {name: getattr(p, name) for name in backbone_options(p.backbone) if hasattr(p, name)}
    extra = {}
    if getattr(loss, "target_layers", 1) > 1:
        extra["out_dim"] = embed_dim * loss.target_layers
    if getattr(loss, "context_weight", 0) > 0:
        extra["context_head"] = True
    return JEPAPredictor(embed_dim, pred_dim=p.dim, depth=p.depth, num_heads=p.num_heads, backbone=p.backbone,
                         **extra, **options)


@register_method("ijepa", config=IJEPAConfig, build_encoder=build_vision_encoder, pipeline="masked_images",
                 encoders={"target": "teacher:target_encoder", "context": "model:context_encoder"})
def build_ijepa(cfg: IJEPAConfig) -> MethodParts:
    return build_latent_prediction(cfg, (3, cfg.data.img_size, cfg.data.img_size), ("",))


LOSS_OPTIONS = ("sigreg_weight", "sigreg_on", "sigreg_tokens", "target_source", "target_stop_grad",
                "context_weight", "context_warmup_steps", "context_start_step", "context_distance_weighting",
                "context_distance_scale")


def latent_prediction_options(cfg, encoder: nn.Module) -> dict:
    """The SIGReg / online-target / V-JEPA 2.1 options of a latent-prediction config (those its schema has)."""
    loss = cfg.loss
    options = {name: getattr(loss, name) for name in LOSS_OPTIONS if hasattr(loss, name)}
    if options.get("sigreg_weight", 0) > 0:
        s = cfg.sigreg
        options["sigreg"] = SIGReg(s.num_slices, s.num_points, s.t_max, s.half_line, s.gather, seed=cfg.trainer.seed)
    if getattr(loss, "target_layers", 1) > 1:
        if not hasattr(encoder, "block_outputs"):
            raise ConfigError(f"config key 'loss.target_layers' is {loss.target_layers} but the encoder "
                              f"{cfg.model.encoder} has no block outputs (multi-layer targets need a ViT)")
        try:
            options["target_blocks"] = target_blocks(len(encoder.blocks), loss.target_layers,
                                                     loss.target_layer_spacing)
        except ValueError as err:
            raise ConfigError(f"config key 'loss.target_layers': {err}") from None
    options["calls_per_step"] = cfg.trainer.grad_accum_steps  # the context-loss ramp counts optimizer steps
    return options


def build_latent_prediction(cfg, input_shape: tuple[int, ...], mask_names: tuple[str, ...]) -> MethodParts:
    """Context encoder + predictor (trained) and the EMA target encoder that follows the context encoder (with
    online targets the monitor reads the context encoder, the one the loss trains)."""
    encoder = build_vision_encoder(cfg)
    options = latent_prediction_options(cfg, encoder)
    method = LatentPrediction(encoder, build_predictor(cfg, encoder.embed_dim), cfg.loss.kind,
                              cfg.loss.variance_weight, cfg.loss.covariance_weight, mask_names, **options)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    monitor = encoder if options.get("target_source") == "online" else target_encoder
    return MethodParts(method, {"target_encoder": Teacher(target_encoder, follows="context_encoder")},
                       monitor_encoder=monitor, token_grid=encoder.token_grid(input_shape))
