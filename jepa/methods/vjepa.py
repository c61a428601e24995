"""V-JEPA (Bardes et al., 2024): latent prediction on video clips with tubelet tokens and 3-D multi-block masks.

Each clip gets two mask sets, as in V-JEPA: short-range (8 blocks of spatial scale 0.15) and long-range (2 blocks of
spatial scale 0.7), every block spanning the whole clip in time, aspect 0.75-1.5; the targets of a set are the union
of its blocks, the context is the rest of the clip. Every sampled token is kept (padding + key-padding masks);
``masks.equalize: truncate`` reproduces the official cut to the batch minimum. The loss is L1 on layer-normed targets
by default, one predictor pass per mask set, averaged over the sets. The I-JEPA loss options apply unchanged:
VICReg terms, λ · SIGReg on the context embeddings (``loss.sigreg_weight``), online targets.

V-JEPA 2.1 (Mur-Labadia et al., arXiv 2603.14482), off by default (``jepa.methods.latent_prediction`` documents
each): the context loss — the predictor also predicts the targets of the visible tokens (one output per mask set
at every context position, its own projection ``predictor.context_proj``), + λ(s) · that loss with λ(s) 0 for
``loss.context_start_step`` optimizer steps then linear to ``loss.context_weight`` over ``loss.context_warmup_steps``
(official: 15000 and 15000) —; ``loss.context_distance_weighting``: each context token's loss x 1/sqrt(d), d its
space-time distance on the (T/t, H/p, W/p) grid to the nearest target token of its set, at least 1 (divided first
by ``loss.context_distance_scale``); ``loss.target_layers`` k: targets from k blocks of the target encoder
(``even`` spacing: V-JEPA 2.1's levels, e.g. blocks 2, 5, 8, 11 of 12 for k = 4), each layer-normed, concatenated
to k·D, which the predictor outputs. The exported encoder is unchanged by all three.

batch: ``pixels`` (B, C, T, H, W) and ``masks`` = [short-range, long-range] ``MaskBatch`` on the (T/t, H/p, W/p) grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError, knob
from ..sections import DataConfig, ModelConfig, PredictorConfig, SIGRegConfig, TrainConfig
from . import MethodParts, register_method
from .ijepa import IJEPALossConfig, build_latent_prediction, build_vision_encoder, check_target_layers


@dataclass
class VideoModelConfig(ModelConfig):
    encoder: str = "vit_video_small"  # vit_video_{tiny,small,base,large,huge}
    tubelet_size: int = knob(2, gt=0)  # frames per token
    pos: Literal["sincos", "rope"] = "sincos"  # additive 3-D sin-cos, or 3-D RoPE in attention (V-JEPA 2)


@dataclass
class BlockSetConfig:
    """One mask generator: ``num_blocks`` blocks whose union is the target set."""

    num_blocks: int = knob(8, gt=0)
    spatial_scale: tuple[float, float] = knob((0.15, 0.15), gt=0, le=1, ordered=True)
    aspect: tuple[float, float] = knob((0.75, 1.5), gt=0, ordered=True)
    temporal_scale: tuple[float, float] = knob((1.0, 1.0), gt=0, le=1, ordered=True)


@dataclass
class VideoMaskConfig:
    short_range: BlockSetConfig = field(default_factory=BlockSetConfig)
    long_range: BlockSetConfig = field(default_factory=lambda: BlockSetConfig(2, (0.7, 0.7)))
    min_keep: int = knob(10, ge=0)
    equalize: Literal["pad", "truncate"] = "pad"  # pad: keep every token; truncate: official cut to batch minimum
    reachable_edges: bool = True


@dataclass
class VideoDataConfig(DataConfig):
    """``root``: a folder with ``train``/``val`` class folders of videos, or ``train_manifest``/``val_manifest``."""

    train_manifest: str = knob("", resumable=True)  # '<path> <label>' lines or CSV with a header; '' : root/train
    val_manifest: str = knob("", resumable=True)
    label_column: str = "label"  # CSV manifests: which column is the label (e.g. motion / object)
    frames_per_clip: int = knob(16, gt=0)
    frame_step: int = knob(4, gt=0)  # take every frame_step-th frame
    fps: float = knob(0.0, ge=0)  # > 0: sample at this many frames per second of video time instead of frame_step
    decode_threads: int = knob(1, gt=0, resumable=True)  # decord threads per DataLoader worker
    batch_size: int = knob(24, gt=0)


@dataclass
class VJEPAConfig(TrainConfig):
    method: str = "vjepa"
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    model: VideoModelConfig = field(default_factory=VideoModelConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    masks: VideoMaskConfig = field(default_factory=VideoMaskConfig)
    loss: IJEPALossConfig = field(default_factory=lambda: IJEPALossConfig(kind="l1"))  # + SIGReg / online targets
    sigreg: SIGRegConfig = field(default_factory=SIGRegConfig)  # read when loss.sigreg_weight > 0

    def check(self, prefix: str) -> None:
        d, m = self.data, self.model
        if d.img_size % m.patch_size:
            raise ConfigError(f"config key 'data.img_size' ({d.img_size}) must be divisible by model.patch_size "
                              f"({m.patch_size})")
        if d.frames_per_clip % m.tubelet_size:
            raise ConfigError(f"config key 'data.frames_per_clip' ({d.frames_per_clip}) must be divisible by "
                              f"model.tubelet_size ({m.tubelet_size})")
        check_target_layers(self)


MASK_SETS = ("short_range", "long_range")


@register_method("vjepa", config=VJEPAConfig, build_encoder=build_vision_encoder, pipeline="masked_clips",
                 encoders={"target": "teacher:target_encoder", "context": "model:context_encoder"})
def build_vjepa(cfg: VJEPAConfig) -> MethodParts:
    shape = (3, cfg.data.frames_per_clip, cfg.data.img_size, cfg.data.img_size)
    return build_latent_prediction(cfg, shape, MASK_SETS)
