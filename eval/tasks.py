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

Labels: ``run.features(split)`` carries the source's one label (the first of ``features.label_columns``);
``run.labelled(mode)`` gives train and val features once per label column (extracted once, labelled per column),
and ``run.record(..., label=column)`` puts the column in the record's config (``label=motion``).
Clip sources: ``run.clips`` is the resolved ``data.labelled.ClipSettings`` (``features.frames_per_clip`` /
``frame_step``, 0: the video encoder's training values; ``num_clips``, ``num_crops``), None for image folders.

Every module of the ``eval`` package is imported when the registry is first read, so a task is one registration in
one file (a test or a plugin may register one too, before ``jepa eval`` runs).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data.labelled import ClipSettings, LabelledSource, find_labelled_source
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
    needs: str = "encoder"  # encoder: --encoder is a vision encoder (run.encoder); vl: a VL-JEPA checkpoint (run.vl)

    @property
    def summary(self) -> str:
        return (self.runner.__doc__ or "").strip().split("\n")[0]


_TASKS: dict[str, TaskSpec] = {}
_discovered = False


def register_task(name: str, config: type, needs: str = "encoder"):
    """Decorator registering ``runner(run: EvalRun) -> list[Record]`` as eval task ``name`` with config section
    ``config`` (a dataclass; its fields are the keys ``<name>.<field>``). ``needs``: ``encoder`` (the run gets a
    frozen vision encoder, ``run.encoder``) or ``vl`` (a whole VL-JEPA model, ``run.vl``)."""
    if needs not in ("encoder", "vl"):
        raise ValueError(f"eval task '{name}': needs '{needs}' is unknown (expected 'encoder' or 'vl')")
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
        _TASKS[name] = TaskSpec(name, config, runner, schema, needs)
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
class LabelledFeatures:
    """Train and val features of one label column (``label`` None: the source's one label)."""

    label: str | None
    train: FeatureSet
    val: FeatureSet


@dataclass
class EvalRun:
    """What a task's runner works with: the config, the frozen encoder, the data, the accelerator, the output
    folder; features through the cache, messages on the main process, records."""

    task: str
    cfg: EvalConfig
    encoder: FrozenEncoder | None  # None for VL tasks
    data: str
    out: Path
    accelerator: object
    which: str
    vl: object = None  # eval.vl_embed.LoadedVL for tasks that need a VL-JEPA model
    _train_classes: dict = field(default_factory=dict, init=False, repr=False)  # label column -> train's classes

    @property
    def section(self):
        """The task's own config section (``cfg.<task>``)."""
        return getattr(self.cfg, self.task)

    @property
    def img_size(self) -> int:
        return self.cfg.features.img_size or (self.encoder or self.vl).img_size

    @functools.cached_property
    def clips(self) -> ClipSettings | None:
        """The clip settings of a clip source (None: an image folder); errors name what does not fit."""
        f = self.cfg.features
        if find_labelled_source(self.data, "train").kind != "clips":
            clip_keys = dict(frames_per_clip=f.frames_per_clip, frame_step=f.frame_step,
                             num_clips=f.num_clips - 1, num_crops=f.num_crops - 1)
            for key, value in clip_keys.items():
                if value:
                    raise ConfigError(f"config key 'features.{key}' is set ({getattr(f, key)}) but --data "
                                      f"'{self.data}' is an image folder (clip settings apply to clip sources)")
            return None
        if self.encoder.clip is None:
            raise ConfigError(f"--data '{self.data}' is a clip source but encoder '{self.encoder.name}' takes images "
                              f"(its config has no data.frames_per_clip); evaluate a video encoder (a V-JEPA "
                              f"checkpoint or export)")
        frames, step = self.encoder.clip
        return ClipSettings(f.frames_per_clip or frames, f.frame_step or step, f.num_clips, f.num_crops)

    @property
    def label_columns(self) -> list[str | None]:
        """The label columns evaluated ([None]: the source's one label)."""
        return list(self.cfg.features.label_columns) or [None]

    def source(self, split: str, label: str | None = None, indices: list[int] | None = None) -> LabelledSource:
        """The eval view of a split, labelled by ``label``; a clip source's val takes train's class list."""
        classes = None
        if self.clips is not None and split != "train":
            if label not in self._train_classes:
                self._train_classes[label] = self.source("train", label).classes
            classes = self._train_classes[label]
        return build_dataset(self.data, split, self.img_size, indices, self.clips, label, classes)

    def features(self, split: str, mode: str = "pooled", indices: list[int] | None = None,
                 label: str | None = None) -> FeatureSet:
        """Features of a split through the cache, labelled by ``label`` (None: the first label column). Features
        are extracted (and cached) on the first label column's source; another column relabels the same rows."""
        f = self.cfg.features
        source = self.source(split, self.label_columns[0], indices)
        result = extract_features(self.encoder, source, mode, self.accelerator, layers=f.layers,
                                  batch_size=f.batch_size, num_workers=f.num_workers, precision=f.precision,
                                  cache_dir=f.cache_dir, progress=f.progress_bar)
        count = (f"{len(result.labels)} images" if self.clips is None else
                 f"{len(result.labels)} videos x {result.num_views} view{'s' if result.num_views > 1 else ''}")
        self.say(f"{split}: {count}, features {tuple(result.features.shape)} "
                 f"({'cache hit' if result.cached else 'extracted'}, key {result.key[:12]})")
        return self.relabel(result, split, label, indices)

    def relabel(self, result: FeatureSet, split: str, label: str | None, indices: list[int] | None = None
                ) -> FeatureSet:
        """``result`` (features of the first label column) with the labels and classes of column ``label``."""
        if label is None or label == self.label_columns[0]:
            return result
        other = self.source(split, label, indices)
        if [path for path, _ in other.samples] != [path for path, _ in result.samples]:
            raise RuntimeError(f"--data '{self.data}' {split}: label columns '{self.label_columns[0]}' and "
                               f"'{label}' list other files (the manifest changed while reading?)")
        return dataclasses.replace(result, labels=torch.tensor(other.labels, dtype=torch.long),
                                   classes=other.classes, samples=other.samples)

    def labelled(self, mode: str = "pooled", train_indices: list[int] | None = None) -> list[LabelledFeatures]:
        """Train and val features for every label column (``features.label_columns``), extracted once."""
        train, val = self.features("train", mode, train_indices), self.features("val", mode)
        return [LabelledFeatures(label, self.relabel(train, "train", label, train_indices),
                                 self.relabel(val, "val", label)) for label in self.label_columns]

    def say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def record(self, metric: str, value: float, seed: int | None = None, label: str | None = None,
               **extra) -> Record:
        """A result record; its config holds the features and task sections, the resolved clip settings of a clip
        source and the label column (``label``) when one is named."""
        config = {"which": self.which, "img_size": self.img_size, "features": dataclasses.asdict(self.cfg.features),
                  self.task: dataclasses.asdict(self.section)}
        if self.vl is not None:  # a VL-JEPA model: its checkpoint, no vision-feature settings
            config.update(which="vl", checkpoint=str(self.vl.ckpt))
            del config["features"]
        elif self.clips is not None:
            config["clips"] = dict(dataclasses.asdict(self.clips), num_views=self.clips.num_views)
        if label is not None:
            config["label"] = label
        config.update(extra)
        return Record(self.task, str(self.data), (self.encoder or self.vl).name, metric, float(value),
                      self.cfg.seed if seed is None else seed, config)
