"""Typed experiment configuration: dataclass schema, YAML files and ``key=value`` overrides.

    cfg = load_config("configs/quickstart.yaml", ["trainer.max_steps=20", "optim.lr=1e-3"])

Unknown keys and wrong types raise ``ConfigError`` naming the key and the closest valid keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


@dataclass
class ModelConfig:
    encoder: str = "vit_tiny"  # vit_{tiny,small,base,large,huge,giant} or cnn:<timm backbone name>
    patch_size: int = 16
    img_size: int = 224  # training resolution; the ViT runs at any size divisible by patch_size
    drop_path: float = 0.0
    qkv_bias: bool = True
    depth: int | None = None  # override the named size's depth (small CPU models)
    embed_dim: int | None = None
    num_heads: int | None = None


@dataclass
class PredictorConfig:
    backbone: str = "transformer"  # transformer | mamba3 | hybrid
    depth: int = 6
    dim: int = 384
    num_heads: int = 12
    mlp_ratio: float = 4.0
    gated_attention: bool = False
    pattern: str = "MMMA"  # hybrid: layer pattern repeated to depth (M: Mamba-3, A: attention)
    d_state: int = 128  # mamba3
    expand: int = 2
    headdim: int = 64
    mimo_rank: int = 1
    bidirectional: str = "split"  # mamba3: split | separate | shared | forward (predictors/backbones/mamba3.py)


@dataclass
class MaskConfig:
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    num_context: int = 1
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    equalize: str = "pad"  # pad (keep every token) | truncate (official: cut to batch minimum)
    reachable_edges: bool = True  # False: the official sampler's bounds (last row/column never in a block)


@dataclass
class DataConfig:
    root: str = ""
    img_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip: bool = False
    batch_size: int = 64  # per process, per micro-batch
    num_workers: int = 4
    pin_memory: bool = True
    on_corrupt: str = "skip"  # skip (counted, logged) | raise


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (reached after warmup)
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_steps: int = 1000
    schedule_steps: int = 0  # horizon of the LR/WD/EMA schedules; 0: trainer.max_steps
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0  # 0 disables clipping
    ema_start: float = 0.996
    ema_end: float = 1.0


@dataclass
class LossConfig:
    kind: str = "smooth_l1"  # smooth_l1 | l1 | l2
    # C-JEPA-style VICReg terms on the mean-pooled context embeddings of each image (0: off, the official I-JEPA)
    variance_weight: float = 0.0
    covariance_weight: float = 0.0


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    output_dir: str = "outputs/run"
    seed: int = 0
    grad_accum_steps: int = 1
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # regional torch.compile of encoder/predictor blocks
    progress_bar: bool = True


@dataclass
class MonitorConfig:
    knn_every: int = 0  # 0: only at start and end
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_img_size: int = 0  # 0: data.img_size
    bank_per_class: int = 0  # 0: the whole train split
    query_per_class: int = 0  # 0: the whole val split
    batch_size: int = 256


@dataclass
class Config:
    method: str = "ijepa"
    model: ModelConfig = field(default_factory=ModelConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


CHOICES = {
    "method": ("ijepa",),
    "masks.equalize": ("pad", "truncate"),
    "data.on_corrupt": ("skip", "raise"),
    "loss.kind": ("smooth_l1", "l1", "l2"),
    "trainer.mixed_precision": ("auto", "bf16", "fp32"),
    "predictor.backbone": ("transformer", "mamba3", "hybrid"),
}


def all_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``trainer.max_steps``."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str, schema: type) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(schema), n=3, cutoff=0.5)
    hint = f"; closest valid keys: {', '.join(close)}" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = list(value) if isinstance(value, (list, tuple)) else [value]  # a scalar is a one-item list
        if not items:
            raise ConfigError(f"config key '{key}' expects a non-empty list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(items)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' expects a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _merge(obj: Any, data: dict, prefix: str = "", root: type | None = None) -> None:
    root = root or type(obj)
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key of an override
                (child, value), = value.items()
                key = f"{key}.{child}"
            raise _unknown_key(key, root)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
            _merge(getattr(obj, name), value, f"{key}.", root)
        else:
            setattr(obj, name, _coerce(key, value, tp))


def parse_override(item: str) -> tuple[str, Any]:
    """``'optim.lr=1e-3'`` -> ``('optim.lr', 0.001)``; values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads '1e-3' as a string
    return key.strip(), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _fix_yaml_numbers(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _fix_yaml_numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_numbers(v) for v in data]
    if isinstance(data, str) and _looks_numeric(data) and data.strip().lower() not in ("nan", "inf", "-inf"):
        return float(data)
    return data


def apply_yaml_and_overrides(cfg: Any, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()):
    """Merge a YAML file, then ``key=value`` overrides (in order), into the dataclass instance ``cfg``; type-checked,
    unknown keys named with the closest valid ones. Returns ``cfg`` (not yet value-validated)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping, got {type(data).__name__}")
        _merge(cfg, _fix_yaml_numbers(data))
    for item in overrides:
        key, value = parse_override(item)
        _merge(cfg, _nest(key, value))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated ``Config`` from an optional YAML file and ``key=value`` overrides (applied in order)."""
    cfg = apply_yaml_and_overrides(Config(), path, overrides)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    def conv(v):
        if isinstance(v, tuple):
            return list(v)
        return v

    return {k: ({kk: conv(vv) for kk, vv in v.items()} if isinstance(v, dict) else conv(v))
            for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat_dict(cfg: Config) -> dict:
    """``{'trainer.max_steps': 1000, ...}`` with lists as strings (tracker hyper-parameters)."""
    out = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = str(v) if isinstance(v, list) or v is None else v
        else:
            out[section] = values
    return out


def validate(cfg: Config) -> None:
    """Value checks beyond types; each error names the key."""
    flat = flat_dict(cfg)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}' is {flat[key]!r}; expected one of {list(allowed)}")
    positive = ["trainer.max_steps", "trainer.grad_accum_steps", "trainer.log_every", "data.batch_size",
                "model.patch_size", "model.img_size", "data.img_size", "predictor.depth", "predictor.dim",
                "predictor.num_heads", "masks.num_targets", "masks.num_context", "monitor.knn_k"]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {flat[key]}")
    for key in ["trainer.checkpoint_every", "monitor.knn_every", "data.num_workers", "optim.warmup_steps",
                "optim.grad_clip", "masks.min_keep", "optim.schedule_steps"]:
        if flat[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {flat[key]}")
    for key in ["masks.target_scale", "masks.context_scale", "data.crop_scale"]:
        lo, hi = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"config key '{key}' must satisfy 0 < low <= high <= 1, got {[lo, hi]}")
    for key in ["masks.target_aspect", "masks.context_aspect"]:
        lo, hi = getattr(cfg.masks, key.split(".")[1])
        if not 0 < lo <= hi:
            raise ConfigError(f"config key '{key}' must satisfy 0 < low <= high, got {[lo, hi]}")
    if cfg.data.img_size % cfg.model.patch_size and not cfg.model.encoder.startswith("cnn:"):
        raise ConfigError(
            f"config key 'data.img_size' ({cfg.data.img_size}) must be divisible by model.patch_size "
            f"({cfg.model.patch_size})"
        )
    if not 0 <= cfg.optim.ema_start <= cfg.optim.ema_end <= 1:
        raise ConfigError(
            f"config keys 'optim.ema_start'/'optim.ema_end' must satisfy 0 <= start <= end <= 1, "
            f"got {cfg.optim.ema_start}, {cfg.optim.ema_end}"
        )
