"""Typed config sections, one per component; a method's schema (``jepa/methods/<name>.py``) combines them.

Every method config is a ``TrainConfig`` (``method``, ``data``, ``optim``, ``trainer``, ``monitor``) plus its own
sections (``model``, ``predictor``, ``masks``, ``loss`` for I-JEPA). Rules sit on the fields (``knob``); cross-field
rules in ``check(prefix)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .config import ConfigError, knob

Precision = Literal["auto", "bf16", "fp32"]


@dataclass
class ModelConfig:
    encoder: str = "vit_tiny"  # a registered encoder: vit_{tiny,small,base,large,huge,giant} or cnn:<timm backbone>
    patch_size: int = knob(16, gt=0)  # ViT only (a CNN's patch is its total stride)
    drop_path: float = knob(0.0, ge=0, lt=1)
    qkv_bias: bool = True
    depth: int | None = knob(None, gt=0)  # override the named size's depth (small CPU models)
    embed_dim: int | None = knob(None, gt=0)
    num_heads: int | None = knob(None, gt=0)
    checkpoint_blocks: int = knob(0, ge=0, resumable=True)  # ViTs: the first N blocks recompute in backward (memory)

    def check(self, prefix: str) -> None:
        if self.encoder.startswith("cnn:"):
            for name in ("depth", "embed_dim", "num_heads"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"config key '{prefix}{name}' is set but a CNN encoder ({self.encoder}) "
                                      f"takes its size from the timm backbone; leave it unset")
            return
        size = vit_size(self.encoder)
        if size is None:
            return  # an unknown name is reported, with the registered ones, when the encoder is built
        width, heads = self.embed_dim or size[0], self.num_heads or size[2]
        if width % heads:
            source = "" if self.embed_dim else f", the width of {self.encoder}"
            raise ConfigError(f"config key '{prefix}num_heads' ({heads}) must divide the encoder width "
                              f"{prefix}embed_dim ({width}{source})")


def vit_size(encoder: str) -> tuple | None:
    """(embed_dim, depth, num_heads, mlp_ratio) of a named ViT size (image ``vit_<size>`` or ``vit_video_<size>``)."""
    from encoders.vit import VIT_SIZES

    return VIT_SIZES.get(encoder.replace("vit_video_", "vit_", 1))


@dataclass
class PredictorConfig:
    backbone: Literal["transformer", "mamba3", "hybrid"] = "transformer"
    depth: int = knob(6, gt=0)
    dim: int = knob(384, gt=0)
    num_heads: int = knob(12, gt=0)
    mlp_ratio: float = knob(4.0, gt=0)
    gated_attention: bool = False
    pattern: str = "MMMA"  # hybrid: layer pattern repeated to depth (M: Mamba-3, A: attention)
    d_state: int = knob(128, ge=4, multiple_of=4)  # mamba3: half of the state is rotated in pairs
    expand: int = knob(2, gt=0)
    headdim: int = knob(64, gt=0)
    mimo_rank: int = knob(1, ge=1)
    bidirectional: Literal["split", "separate", "shared", "forward"] = "split"  # mamba3 direction handling
    checkpoint_blocks: int = knob(0, ge=0, resumable=True)  # transformer: the first N blocks recompute in backward

    def check(self, prefix: str) -> None:
        if not self.pattern or set(self.pattern) - {"M", "A"}:
            raise ConfigError(f"config key '{prefix}pattern' is {self.pattern!r}; expected a non-empty string of "
                              f"'M' (Mamba-3) and 'A' (attention)")
        if self.backbone != "mamba3" and self.dim % self.num_heads:
            raise ConfigError(f"config key '{prefix}num_heads' ({self.num_heads}) must divide {prefix}dim "
                              f"({self.dim})")


@dataclass
class MaskConfig:
    num_targets: int = knob(4, gt=0)
    target_scale: tuple[float, float] = knob((0.15, 0.2), gt=0, le=1, ordered=True)
    target_aspect: tuple[float, float] = knob((0.75, 1.5), gt=0, ordered=True)
    num_context: int = knob(1, gt=0)
    context_scale: tuple[float, float] = knob((0.85, 1.0), gt=0, le=1, ordered=True)
    context_aspect: tuple[float, float] = knob((1.0, 1.0), gt=0, ordered=True)
    min_keep: int = knob(10, ge=0)
    equalize: Literal["pad", "truncate"] = "pad"  # pad: keep every token; truncate: official cut to batch minimum
    reachable_edges: bool = True  # False: the official sampler's bounds (last row/column never in a block)


@dataclass
class DataConfig:
    root: str = knob("", resumable=True)
    img_size: int = knob(224, gt=0)
    crop_scale: tuple[float, float] = knob((0.3, 1.0), gt=0, le=1, ordered=True)
    hflip: bool = False
    batch_size: int = knob(64, gt=0)  # per process, per micro-batch
    num_workers: int = knob(4, ge=0, resumable=True)
    pin_memory: bool = knob(True, resumable=True)
    on_corrupt: Literal["skip", "raise"] = knob("skip", resumable=True)  # skip: counted and logged
    # cpu: the DataLoader workers decode and crop (bicubic); device: they read the JPEG bytes and draw the crop box,
    # the batch is decoded on the device (nvJPEG on CUDA) and cropped with roi_align (bilinear). masked_images only
    decode: Literal["cpu", "device"] = "cpu"


@dataclass
class OptimConfig:
    # resumable: the way out of a diverged run is to resume its last good checkpoint with a lower LR or clipping
    lr: float = knob(1e-3, gt=0, resumable=True)  # peak learning rate (reached after warmup)
    start_lr: float = knob(2e-4, ge=0, resumable=True)
    final_lr: float = knob(1e-6, ge=0, resumable=True)
    warmup_steps: int = knob(1000, ge=0)
    schedule_steps: int = knob(0, ge=0)  # horizon of the LR/WD/EMA schedules; 0: trainer.max_steps
    weight_decay: float = knob(0.04, ge=0)
    final_weight_decay: float = knob(0.4, ge=0)
    betas: tuple[float, float] = knob((0.9, 0.999), ge=0, lt=1)
    grad_clip: float = knob(0.0, ge=0, resumable=True)  # 0 disables clipping
    ema_start: float = knob(0.996, ge=0, le=1)
    ema_end: float = knob(1.0, ge=0, le=1)

    def check(self, prefix: str) -> None:
        if self.ema_start > self.ema_end:
            raise ConfigError(f"config keys '{prefix}ema_start'/'{prefix}ema_end' must satisfy 0 <= start <= end "
                              f"<= 1, got {self.ema_start}, {self.ema_end}")


@dataclass
class LossConfig:
    kind: Literal["smooth_l1", "l1", "l2"] = "smooth_l1"
    # C-JEPA-style VICReg terms on the mean-pooled context embeddings of each image (0: off, the official I-JEPA)
    variance_weight: float = knob(0.0, ge=0)
    covariance_weight: float = knob(0.0, ge=0)


@dataclass
class SIGRegConfig:
    """SIGReg's sketch (LeJEPA, ``jepa.losses.SIGReg``): ``num_slices`` random directions redrawn every step (seeded
    by the seed and the step, so resume is exact), the Epps–Pulley test with ``num_points`` knots on [0, t_max]
    (``half_line``) or [−t_max, t_max]; ``gather``: statistics of the global batch (all-reduced sums)."""

    num_slices: int = knob(256, gt=0)
    num_points: int = knob(17, ge=2)
    t_max: float = knob(3.0, gt=0)
    half_line: bool = True
    gather: bool = True


@dataclass
class TrainerConfig:
    max_steps: int = knob(1000, gt=0, resumable=True)  # optimizer steps
    output_dir: str = knob("outputs/run", resumable=True)
    seed: int = 0
    grad_accum_steps: int = knob(1, gt=0)
    checkpoint_every: int = knob(500, ge=0, resumable=True)
    keep_checkpoints: int = knob(2, ge=0, resumable=True)
    log_every: int = knob(20, gt=0, resumable=True)
    mixed_precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = knob(False, resumable=True)  # regional torch.compile of the blocks
    progress_bar: bool = knob(True, resumable=True)
    plot: bool = knob(True, resumable=True)  # write <output_dir>/health.png (loss, kNN, collapse) after the run


@dataclass
class MonitorConfig:
    RESUMABLE = True  # monitoring never changes training

    knn_every: int = knob(0, ge=0)  # 0: only at start and end
    knn_k: int = knob(20, gt=0)
    knn_temperature: float = knob(0.07, gt=0)
    knn_img_size: int = knob(0, ge=0)  # 0: data.img_size
    bank_per_class: int = knob(0, ge=0)  # 0: the whole train split
    query_per_class: int = knob(0, ge=0)  # 0: the whole val split
    batch_size: int = knob(256, gt=0)


@dataclass
class TrainConfig:
    """What every method's schema has; ``method`` picks the schema (``jepa.methods``)."""

    method: str = "ijepa"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
