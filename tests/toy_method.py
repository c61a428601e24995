"""A toy method written the way a new method is added: this one file (its config, its module, one registration).

Two views of each image: the online encoder sees the context tokens of the multi-block masks, the EMA teacher the
whole image; a small MLP predicts the teacher's mean-pooled, layer-normed embedding from the online one (a two-view
latent prediction, BYOL-like, on the I-JEPA data pipeline).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from jepa.config import knob
from jepa.methods import MethodOutput, MethodParts, Teacher, register_method
from jepa.methods.ijepa import build_vision_encoder
from jepa.sections import MaskConfig, ModelConfig, TrainConfig


@dataclass
class HeadConfig:
    hidden: int = knob(64, gt=0)


@dataclass
class TwoViewConfig(TrainConfig):
    method: str = "toy_two_view"
    model: ModelConfig = field(default_factory=ModelConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    head: HeadConfig = field(default_factory=HeadConfig)


class TwoView(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int):
        super().__init__()
        self.encoder = encoder
        dim = encoder.embed_dim
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, batch, teachers) -> MethodOutput:
        masks = batch.masks[0]
        with torch.no_grad():
            target = teachers["teacher"](batch.pixels).mean(1)
            target = F.layer_norm(target, target.shape[-1:])
        context = self.encoder(batch.pixels, masks.context_idx, masks.context_pad)
        keep = (~masks.context_pad).unsqueeze(-1).to(context.dtype)
        pred = self.head((context * keep).sum(1) / keep.sum(1))
        loss = F.mse_loss(pred.float(), target.float())
        return MethodOutput(loss, {"pooled_std": pred.detach().std(0).mean()}, {"pred": pred.detach(), "target": target})


@register_method("toy_two_view", config=TwoViewConfig, build_encoder=build_vision_encoder, pipeline="masked_images",
                 encoders={"teacher": "teacher:teacher", "online": "model:encoder"})
def build_two_view(cfg: TwoViewConfig) -> MethodParts:
    encoder = build_vision_encoder(cfg)
    teacher = copy.deepcopy(encoder).requires_grad_(False)
    return MethodParts(TwoView(encoder, cfg.head.hidden), {"teacher": Teacher(teacher, follows="encoder")},
                       monitor_encoder=teacher, token_grid=encoder.token_grid((3, cfg.data.img_size, cfg.data.img_size)))
