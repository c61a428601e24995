"""Typed configuration of frozen evaluations: dataclass schema, ``configs/eval/<task>.yaml``, ``key=value``
overrides. Unknown keys raise ``ConfigError`` naming the closest valid keys; values are type-checked with
``jepa.config``'s rules (lists element by element).

    cfg = load_eval_config("linear", None, ["linear.epochs=20", "features.img_size=128"])
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


from jepa.config import ConfigError, apply_yaml_and_overrides

TASKS = ("linear", "attentive", "knn", "lowshot")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"


@dataclass
class FeatureConfig:
    img_size: int = 0  # 0: the encoder's training data.img_size (224 for timm: encoders)
    batch_size: int = 128  # per process
    num_workers: int = 4
    layers: int = 1  # pooled features: mean-pool each of the last `layers` blocks and concatenate (1: last layer)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    cache_dir: str = ""  # "": $OPENJEPA_CACHE or ~/.cache/openjepa/features
    progress_bar: bool = True
    timm_seed: int = 0  # random init of timm:<name> encoders (part of the cache key through the weights)


@dataclass
class LinearConfig:
    lrs: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 0.0005, 0.005])
    epochs: int = 50
    batch_size: int = 256
    momentum: float = 0.9
    holdout_fraction: float = 0.1  # part of the train split kept out for selecting the head


@dataclass
class AttentiveConfig:
    depth: int = 1  # 1: one cross-attention block; 4: three self-attention blocks over the tokens, then it
    num_heads: int = 0  # 0: the most heads (<= 16) that divide the feature dim with head dim >= 32
    mlp_ratio: float = 4.0
    lrs: list[float] = field(default_factory=lambda: [0.0001, 0.0003, 0.001])
    weight_decays: list[float] = field(default_factory=lambda: [0.01, 0.1])
    epochs: int = 20
    batch_size: int = 128
    warmup_epochs: int = 1
    holdout_fraction: float = 0.1


@dataclass
class KNNConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 200])
    temperature: float = 0.07


@dataclass
class LowShotConfig:
    shots: list[int] = field(default_factory=lambda: [1, 2, 5, 13])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    split_file: str = ""  # SimCLR-format subset file (ImageNet 1% / 10%): replaces the k-shot sweep
    lambdas: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1])  # L2 strengths
    default_lambda: float = 1e-3  # used where cross-validation is impossible (one shot per class)
    folds: int = 5  # at most; never more than the shots per class
    max_iter: int = 300  # L-BFGS iterations per fit


@dataclass
class EvalConfig:
    seed: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    attentive: AttentiveConfig = field(default_factory=AttentiveConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    lowshot: LowShotConfig = field(default_factory=LowShotConfig)


CHOICES = {"features.precision": ("auto", "bf16", "fp32"), "attentive.depth": (1, 4)}


def validate(cfg: EvalConfig) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) not in allowed:
            raise ConfigError(f"config key '{key}' is {getattr(getattr(cfg, section), name)!r}; expected one of "
                              f"{list(allowed)}")
    for key in ("features.batch_size", "features.layers", "linear.epochs", "linear.batch_size", "attentive.epochs",
                "attentive.batch_size", "lowshot.folds", "lowshot.max_iter"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {getattr(getattr(cfg, section), name)}")
    for key, values in (("knn.ks", cfg.knn.ks), ("lowshot.shots", cfg.lowshot.shots)):
        if any(v <= 0 for v in values):
            raise ConfigError(f"config key '{key}' must hold positive ints, got {values}")
    for key, fraction in (("linear.holdout_fraction", cfg.linear.holdout_fraction),
                          ("attentive.holdout_fraction", cfg.attentive.holdout_fraction)):
        if not 0 < fraction < 1:
            raise ConfigError(f"config key '{key}' must be in (0, 1), got {fraction}")


def default_config_path(task: str) -> Path | None:
    path = CONFIG_DIR / f"{task}.yaml"
    return path if path.is_file() else None


def load_eval_config(task: str, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                     ) -> EvalConfig:
    """Defaults <- ``path`` (or ``configs/eval/<task>.yaml`` when present) <- overrides; validated."""
    if task not in TASKS:
        raise ConfigError(f"eval task '{task}' is unknown (expected one of {list(TASKS)})")
    path = Path(path) if path is not None else default_config_path(task)
    cfg = apply_yaml_and_overrides(EvalConfig(), path, overrides)
    validate(cfg)
    return cfg


def to_dict(cfg: EvalConfig) -> dict:
    return dataclasses.asdict(cfg)
