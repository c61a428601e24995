"""Typed configuration: dataclass schemas, YAML files and ``key=value`` overrides, checked recursively.

    cfg = load_config("configs/quickstart.yaml", ["trainer.max_steps=20", "optim.lr=1e-3"])

The schema is chosen by the config's ``method`` (each method registers its schema in ``jepa.methods``). Choices are
``Literal[...]`` annotations; ranges and other per-field rules are declared with ``knob(default, gt=..., ...)`` and
checked for every field of every section, whatever the other options; a section may add cross-field rules in a
``check(self, prefix)`` method. Unknown keys and wrong types raise ``ConfigError`` naming the key and the closest
valid keys. ``flatten`` is the one dotted view used for printing, checkpoint compatibility and resumable keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


# ------------------------------------------------------------------------------------------------ field rules
def knob(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
         le: float | None = None, lt: float | None = None, multiple_of: int | None = None, ordered: bool = False,
         resumable: bool = False, factory: Any = None):
    """A config field with its rules: bounds (``gt``/``ge``/``le``/``lt``, applied to every element of a list or
    tuple), ``multiple_of``, ``ordered`` (a range ``(low, high)`` with ``low <= high``), ``resumable`` (may change
    when a run resumes from a checkpoint). ``factory`` builds a mutable default."""
    rules = {k: v for k, v in dict(gt=gt, ge=ge, le=le, lt=lt, multiple_of=multiple_of).items() if v is not None}
    metadata = {"rules": rules, "ordered": ordered, "resumable": resumable}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_RULE_TEXT = {"gt": ">", "ge": ">=", "le": "<=", "lt": "<"}
_RULE_OK = {"gt": lambda v, b: v > b, "ge": lambda v, b: v >= b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def _check_rules(key: str, value: Any, f: dataclasses.Field) -> None:
    rules, values = f.metadata.get("rules", {}), (list(value) if isinstance(value, (list, tuple)) else [value])
    for name, bound in rules.items():
        for v in values:
            if v is None:
                continue
            if name == "multiple_of":
                if v % bound:
                    raise ConfigError(f"config key '{key}' must be a multiple of {bound}, got {value}")
            elif not _RULE_OK[name](v, bound):
                raise ConfigError(f"config key '{key}' must be {_RULE_TEXT[name]} {bound}, got {value}")
    if f.metadata.get("ordered") and list(values) != sorted(values):
        raise ConfigError(f"config key '{key}' must satisfy low <= high, got {list(values)}")


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field's declared rules, recursively, then each section's own ``check(prefix)``."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
        else:
            _check_rules(key, value, f)
    if hasattr(cfg, "check"):
        cfg.check(prefix)


# ------------------------------------------------------------------------------------------------ keys
def all_keys(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a schema (default: the default method's), e.g. ``trainer.max_steps``."""
    schema = schema or method_schema(None)
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        keys += all_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{f.name}"]
    return keys


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{'trainer.max_steps': 1000, 'masks.target_scale': [0.15, 0.2], ...}`` (tuples as lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{key}."))
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def resumable_keys(cfg: Any, prefix: str = "") -> set[str]:
    """Dotted keys declared ``resumable`` (whole sections whose class sets ``RESUMABLE = True`` included)."""
    out = set()
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out |= set(flatten(value, f"{key}.")) if getattr(value, "RESUMABLE", False) else resumable_keys(
                value, f"{key}.")
        elif f.metadata.get("resumable"):
            out.add(key)
    return out


def _unknown_key(key: str, schema: type) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(schema), n=3, cutoff=0.5)
    hint = f"; closest valid keys: {', '.join(close)}" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


# ------------------------------------------------------------------------------------------------ values
def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = list(typing.get_args(tp))
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {allowed}")
        return value
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


# ------------------------------------------------------------------------------------------------ parsing
def parse_override(item: str) -> tuple[str, Any]:
    """``'optim.lr=1e-3'`` -> ``('optim.lr', 0.001)``; values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(err)})") from None
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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line L, column C: <problem>' of a YAML parse error (1-based, where the parser stopped)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def read_yaml(path: str | Path | None) -> dict:
    """The mapping of a YAML config file; a missing file, a syntax error (named by line and column) or a file that
    holds no mapping is a ``ConfigError`` naming the file."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping, got {type(data).__name__}")
    return _fix_yaml_numbers(data)


def apply_yaml_and_overrides(cfg: Any, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()):
    """Merge a YAML file, then ``key=value`` overrides (in order), into the dataclass instance ``cfg``; type-checked,
    unknown keys named with the closest valid ones. Returns ``cfg`` (not yet validated)."""
    _merge(cfg, read_yaml(path))
    for item in overrides:
        key, value = parse_override(item)
        _merge(cfg, _nest(key, value))
    return cfg


def method_schema(name: str | None) -> type:
    """The config dataclass of method ``name`` (None: the default method); errors list the registered ones."""
    from .methods import get_method  # the registry lives with the methods; imported when a config is built

    return get_method(name).config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """A validated config of the method named by ``method`` (YAML, then overrides; default ``ijepa``)."""
    method = read_yaml(path).get("method")
    for item in overrides:
        key, value = parse_override(item)
        if key == "method":
            method = value
    cfg = apply_yaml_and_overrides(method_schema(method)(), path, overrides)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples as lists), the YAML form."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
