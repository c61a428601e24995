"""Evaluation tasks as registered parts: one registration gives a task its name, config section and runner.

    @dataclass
    class KNNConfig:
        ks: list[int] = knob(factory=lambda: [10, 20, 200], gt=0)

    @register_task("knn", config=KNNConfig)
    def run_knn(run: EvalRun) -> list[Record]:
        train, val = run.features("train"), run.features("val")
        ...

A task's config is the common part (``seed``, ``features``) plus its own section under its name, so ``knn.ks=[10]``
sets the kNN section and another task's keys (``linear.epochs`` on a kNN run) are unknown keys. Choices and ranges
are declared on the fields (``Literal[...]``, ``jepa.config.knob``) and checked by ``jepa.config.validate``; a
section may add cross-field rules in ``check(self, prefix)``. The runner gets an ``EvalRun`` (encoder, data, features
through the cache, records) and returns the records to append.

Every module of the ``eval`` package is imported when the registry is first read, so a task is one registration in
one file (a test or a plugin may register one too, before ``jepa eval`` runs).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from jepa.config import ConfigError, apply_yaml_and_overrides, validate

from .encoders import FrozenEncoder
from .features import FeatureConfig, FeatureSet, build_dataset, extract_features
from .results import Record

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"
COMMON_KEYS = ("seed", "features")


@dataclass
class EvalConfig:
    """The part every task's config has; ``task_schema(name)`` adds the task's section under its name."""

    seed: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: type  # the task's section (a dataclass)
    runner: Callable[["EvalRun"], list[Record]]
    schema: type  # EvalConfig + ``<name>: config``

    @property
    def summary(self) -> str:
        return (self.runner.__doc__ or "").strip().split("\n")[0]


_TASKS: dict[str, TaskSpec] = {}
_discovered = False


def register_task(name: str, config: type):
    """Decorator registering ``runner(run: EvalRun) -> list[Record]`` as eval task ``name`` with config section
    ``config`` (a dataclass; its fields are the keys ``<name>.<field>``)."""
    if not name.isidentifier() or name in COMMON_KEYS:
        raise ValueError(f"eval task name '{name}' must be a Python identifier other than {list(COMMON_KEYS)}")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"eval task '{name}': config must be a dataclass, got {config!r}")

    def wrap(runner):
        known = _TASKS.get(name)
        same = known is not None and (known.runner.__module__, known.runner.__qualname__) == (
            runner.__module__, runner.__qualname__)  # a module imported again
        if known is not None and not same:
            raise ValueError(f"eval task '{name}' is already registered (by {known.runner.__module__})")
        schema = dataclasses.make_dataclass(f"EvalConfig_{name}", [(name, config, field(default_factory=config))],
                                            bases=(EvalConfig,))
        _TASKS[name] = TaskSpec(name, config, runner, schema)
        return runner

    return wrap


def _discover() -> None:
    """Import every module of this package once, so that each registers its tasks."""
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")
    _discovered = True


def task_names() -> list[str]:
    _discover()
    return sorted(_TASKS)


def get_task(name: str) -> TaskSpec:
    names = task_names()
    if name not in _TASKS:
        raise ConfigError(f"eval task '{name}' is unknown (expected one of {names})")
    return _TASKS[name]


def default_config_path(task: str) -> Path | None:
    path = CONFIG_DIR / f"{task}.yaml"
    return path if path.is_file() else None


_UNKNOWN_KEY = re.compile(r"unknown config key '([^'.]+)\.")


def load_eval_config(task: str, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Defaults <- ``path`` (or ``configs/eval/<task>.yaml`` when present) <- overrides; validated. The result is an
    ``EvalConfig`` with the task's section as attribute ``<task>``."""
    spec = get_task(task)
    path = Path(path) if path is not None else default_config_path(task)
    try:
        cfg = apply_yaml_and_overrides(spec.schema(), path, overrides)
    except ConfigError as err:
        section = _UNKNOWN_KEY.match(str(err))
        if section and section.group(1) in _TASKS and section.group(1) != task:
            raise ConfigError(f"{err} ('{section.group(1)}' is the section of the {section.group(1)} task; this is "
                              f"a {task} run, whose sections are {[*COMMON_KEYS[1:], task]})") from None
        raise
    validate(cfg)
    return cfg


@dataclass
class EvalRun:
    """What a task's runner works with: the config, the frozen encoder, the data, the accelerator, the output
    folder; features through the cache, messages on the main process, records."""

    task: str
    cfg: EvalConfig
    encoder: FrozenEncoder
    data: str
    out: Path
    accelerator: object
    which: str

    @property
    def section(self):
        """The task's own config section (``cfg.<task>``)."""
        return getattr(self.cfg, self.task)

    @property
    def img_size(self) -> int:
        return self.cfg.features.img_size or self.encoder.img_size

    def features(self, split: str, mode: str = "pooled", indices: list[int] | None = None) -> FeatureSet:
        f = self.cfg.features
        source = build_dataset(self.data, split, self.img_size, indices)
        result = extract_features(self.encoder, source, mode, self.accelerator, layers=f.layers,
                                  batch_size=f.batch_size, num_workers=f.num_workers, precision=f.precision,
                                  cache_dir=f.cache_dir, progress=f.progress_bar)
        self.say(f"{split}: {len(result.labels)} images, features {tuple(result.features.shape)} "
                 f"({'cache hit' if result.cached else 'extracted'}, key {result.key[:12]})")
        return result

    def say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def record(self, metric: str, value: float, seed: int | None = None, **extra) -> Record:
        config = {"which": self.which, "img_size": self.img_size, "features": dataclasses.asdict(self.cfg.features),
                  self.task: dataclasses.asdict(self.section), **extra}
        return Record(self.task, str(self.data), self.encoder.name, metric, float(value),
                      self.cfg.seed if seed is None else seed, config)
