"""LeJEPA (Balestriero & LeCun, arXiv 2511.08544): multi-view prediction + SIGReg, with no teacher, no EMA and no
stop-gradient.

    e_v = mean_tokens(backbone(view_v))           (B, D)   every global and local view, one shared ViT
    z_v = projector(e_v)                          (B, K)   MLP (BatchNorm), all views' rows in one batch
    c   = mean over the V_g global views of z_v   (B, K)   the target; not detached (the paper: no stop-gradient)
    loss = (1 − λ) · mean_{v, b, k} (c − z_v)²  +  λ · mean_v SIGReg(z_v)

SIGReg (``jepa.losses.SIGReg``) tests each view's (B, K) projections against N(0, I) along ``sigreg.num_slices``
random directions redrawn every step (Epps–Pulley, ``sigreg.num_points`` knots on [0, ``sigreg.t_max``]), over the
global batch (``sigreg.gather``). The kNN monitor, eval and export read the backbone (``model:backbone``); the
collapse monitor tracks the pooled global-view embeddings and the projections.

batch: ``views`` = ``MultiView(crops=[(B, V_g, 3, S, S), (B, V_l, 3, s, s)])`` normalised by the
``multicrop_images`` pipeline's device transform (``data/multicrop.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from ..config import ConfigError, knob
from ..losses import SIGReg
from ..sections import DataConfig, ModelConfig, SIGRegConfig, TrainConfig
from . import MethodOutput, MethodParts, register_method
from .ijepa import build_vision_encoder
from .latent_prediction import feature_std


@dataclass
class MultiCropDataConfig(DataConfig):
    """Global views: ``global_views`` crops of ``img_size`` px (area ``crop_scale``); local views: ``local_views``
    crops of ``local_size`` px (area ``local_scale``); every view flipped with probability 1/2 (``hflip``)."""

    img_size: int = knob(128, gt=0)
    crop_scale: tuple[float, float] = knob((0.3, 1.0), gt=0, le=1, ordered=True)
    hflip: bool = True
    batch_size: int = knob(256, gt=1)  # BatchNorm and SIGReg need a batch
    global_views: int = knob(2, gt=0)
    local_views: int = knob(6, ge=0)
    local_size: int = knob(64, gt=0)
    local_scale: tuple[float, float] = knob((0.05, 0.3), gt=0, le=1, ordered=True)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # bilinear: torchvision's fast uint8 path


@dataclass
class AugmentConfig:
    """DINO-style colour augmentation of every view (LeJEPA's recipe; torchvision's parameter meanings)."""

    where: Literal["device", "workers"] = knob("device", resumable=True)  # same parameters either way
    jitter_prob: float = knob(0.8, ge=0, le=1)
    brightness: float = knob(0.4, ge=0)
    contrast: float = knob(0.4, ge=0)
    saturation: float = knob(0.2, ge=0)
    hue: float = knob(0.1, ge=0, le=0.5)
    grayscale_prob: float = knob(0.2, ge=0, le=1)
    blur_prob: float = knob(0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = knob((0.1, 2.0), gt=0, ordered=True)
    solarize_prob: float = knob(0.2, ge=0, le=1)


@dataclass
class ProjectorConfig:
    depth: int = knob(3, gt=0)  # linear layers; each but the last followed by the norm and a ReLU
    hidden_dim: int = knob(2048, gt=0)
    out_dim: int = knob(128, gt=0)  # the minimal Imagenette recipe: 16
    norm: Literal["batch", "layer", "none"] = "batch"


@dataclass
class LeJEPALossConfig:
    sigreg_weight: float = knob(0.05, gt=0, lt=1)  # λ: (1 − λ) prediction + λ SIGReg


@dataclass
class LeJEPAConfig(TrainConfig):
    method: str = "lejepa"
    data: MultiCropDataConfig = field(default_factory=MultiCropDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    loss: LeJEPALossConfig = field(default_factory=LeJEPALossConfig)
    sigreg: SIGRegConfig = field(default_factory=SIGRegConfig)

    def check(self, prefix: str) -> None:
        d, m = self.data, self.model
        if d.global_views + d.local_views < 2:
            raise ConfigError(f"config keys 'data.global_views' ({d.global_views}) + 'data.local_views' "
                              f"({d.local_views}) must give at least 2 views (one view predicts itself)")
        if m.encoder.startswith("cnn:"):
            return
        for key, size in (("img_size", d.img_size), ("local_size", d.local_size if d.local_views else 0)):
            if size % m.patch_size:
                raise ConfigError(f"config key 'data.{key}' ({size}) must be divisible by model.patch_size "
                                  f"({m.patch_size})")


class Projector(nn.Module):
    """(N, D) -> (N, out_dim): ``depth`` linear layers, each hidden one followed by ``norm`` and a ReLU."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, depth: int = 3, norm: str = "batch"):
        super().__init__()
        norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": lambda dim: nn.Identity()}
        layers, dim = [], in_dim
        for _ in range(depth - 1):
            layers += [nn.Linear(dim, hidden_dim), norms[norm](hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeJEPA(nn.Module):
    """forward(batch, teachers) -> MethodOutput; submodules ``backbone`` (the encoder), ``projector``, ``sigreg``
    (its slice counter is a buffer, saved with the model)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, sigreg: SIGReg, sigreg_weight: float,
                 global_views: int):
        super().__init__()
        self.backbone, self.projector, self.sigreg = backbone, projector, sigreg
        self.sigreg_weight, self.global_views = sigreg_weight, global_views

    def embed_views(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """[(B, V_i, 3, H_i, W_i)] -> (V, B, D) mean-pooled backbone tokens, views in crop order (one backbone
        pass per crop size)."""
        pooled = []
        for crop in crops:
            batch, views = crop.shape[:2]
            tokens = self.backbone(crop.flatten(0, 1))  # (B * V_i, N, D)
            pooled.append(tokens.mean(1).view(batch, views, -1).transpose(0, 1))
        return torch.cat(pooled)

    def forward(self, batch, teachers: dict[str, nn.Module]) -> MethodOutput:
        views = batch.views
        if views is None:
            raise ValueError("a LeJEPA batch needs multi-crop views (batch.views; the 'multicrop_images' pipeline)")
        if views.num_views[0] != self.global_views:
            raise ValueError(f"batch has {views.num_views[0]} global views, the method expects {self.global_views}")
        embeddings = self.embed_views(views.crops)  # (V, B, D)
        num_views, batch_size = embeddings.shape[:2]
        z = self.projector(embeddings.flatten(0, 1)).view(num_views, batch_size, -1).float()  # (V, B, K)
        centers = z[:self.global_views].mean(0)
        prediction = (centers - z).square().mean()
        regularizer = self.sigreg(z)
        loss = (1 - self.sigreg_weight) * prediction + self.sigreg_weight * regularizer
        global_embeddings = embeddings[:self.global_views].detach().flatten(0, 1)
        projections = z.detach().flatten(0, 1)
        logs = {"prediction_loss": prediction.detach(), "sigreg": regularizer.detach(),
                "embedding_std": feature_std(global_embeddings), "projection_std": feature_std(projections)}
        return MethodOutput(loss, logs, {"embedding": global_embeddings, "projection": projections})


def build_sigreg(cfg) -> SIGReg:
    s = cfg.sigreg
    return SIGReg(s.num_slices, s.num_points, s.t_max, s.half_line, s.gather, seed=cfg.trainer.seed)


@register_method("lejepa", config=LeJEPAConfig, build_encoder=build_vision_encoder, pipeline="multicrop_images",
                 encoders={"backbone": "model:backbone"})
def build_lejepa(cfg: LeJEPAConfig) -> MethodParts:
    backbone = build_vision_encoder(cfg)
    p = cfg.projector
    projector = Projector(backbone.embed_dim, p.hidden_dim, p.out_dim, p.depth, p.norm)
    method = LeJEPA(backbone, projector, build_sigreg(cfg), cfg.loss.sigreg_weight, cfg.data.global_views)
    return MethodParts(method, {}, monitor_encoder=backbone, token_grid=())
