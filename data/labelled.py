"""Labelled sources and their loaders (deterministic eval views) for monitors and evaluation.

A ``LabelledSource`` is what evaluation and the training monitors read, whatever holds the data: image folders
(``data.folder.ImageFolderDataset``), clip sources (``ClipViews`` over ``data.video.VideoClipDataset``); caption /
VQA pairs implement the same interface. ``find_labelled_source`` is the one place that tells what a ``--data`` value
holds, ``open_labelled_source`` opens it; ``labelled_loader`` batches any source as ``(pixels, labels)``.

A ``--data`` folder is, for each split (``train``, ``val``):
- a manifest ``<root>/<split>.csv`` or ``<root>/<split>.txt`` (``<path> <label>`` lines, or a CSV with a ``path``
  column and label columns, as ``data.motion`` writes them): a clip source; it wins over class folders beside it;
- ``<root>/<split>/<class>/*.mp4|avi|mkv|webm|mov``: a clip source (the class folder is the label);
- ``<root>/<split>/<class>/*.JPEG|png|...``: an image folder.
"""
from __future__ import annotations

import abc
import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .subsets import per_class_choice
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

MANIFEST_SUFFIXES = (".csv", ".txt")


class LabelledSourceError(ValueError):
    """A ``--data`` value that holds no labelled source, or asks a source for what it does not have; the message
    names the path and what was expected."""


class LabelledSource(torch.utils.data.Dataset, abc.ABC):
    """Labelled samples in a fixed order, and a fingerprint of them for the feature cache.

    - ``samples``: ``[(file path, label)]``; rows of every feature tensor follow this order;
    - ``classes``: the class names that labels index (a VQA source: its answer vocabulary);
    - ``labels``: the label of every sample;
    - ``transform``: what turns a decoded file into pixels (its ``repr`` is part of the feature cache key);
    - ``source[i]`` -> ``{'image': (3, H, W) image, (V, 3, T, H, W) views of a clip (``ClipViews``), or None for a
      skipped file, 'label': int, 'index': int, ...}``; a source may add fields (a question's ``'text'``);
    - ``fingerprint()``: SHA-256 of the class names and of each sample's record (file path, label, size, mtime): it
      changes when a file, a label or a class changes. A source whose samples carry more than a file (a clip's time
      range, a caption) adds it in ``sample_record``.
    """

    samples: list[tuple[Path, int]]
    classes: list[str]
    transform: Callable
    location: str = "a labelled source"  # what errors name: the split folder, the manifest

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [sample[1] for sample in self.samples]

    @abc.abstractmethod
    def __getitem__(self, key) -> dict:
        """An item ``{'image': pixels | None (skipped), 'label': int, 'index': int, ...}`` for an int or sampler key."""

    def sample_record(self, sample: tuple) -> str:
        path, label = sample[0], sample[1]
        stat = os.stat(path)
        return f"{os.path.abspath(path)}|{label}|{stat.st_size}|{stat.st_mtime_ns}"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        for sample in self.samples:
            digest.update(f"{self.sample_record(sample)}\n".encode())
        return digest.hexdigest()

    def subset(self, indices: list[int]) -> "LabelledSource":
        """The same source over ``samples[i] for i in indices`` (in that order); classes are kept."""
        out = copy.copy(self)
        out.samples = [self.samples[i] for i in indices]
        return out


@dataclass(frozen=True)
class ClipSettings:
    """How a clip source is seen: ``frames_per_clip`` frames ``frame_step`` apart, ``num_clips`` clips at uniform
    temporal positions, ``num_crops`` square crops of each (1: the centre; 3: left / centre / right, or top / centre /
    bottom, along the long side, as V-JEPA evaluates): ``num_clips * num_crops`` views per video."""

    frames_per_clip: int
    frame_step: int
    num_clips: int = 1
    num_crops: int = 1

    def __post_init__(self):
        for name in ("frames_per_clip", "frame_step", "num_clips", "num_crops"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"clip setting {name} must be an integer >= 1, got {value!r}")

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops


@dataclass(frozen=True)
class SourceLayout:
    """What a ``--data`` value holds for one split: ``kind`` 'images' (``path``: the root) or 'clips' (``path``: the
    split's manifest file, or its folder of class folders)."""

    kind: str
    path: Path

    @property
    def is_manifest(self) -> bool:
        return self.path.is_file()


def _neither(root: Path, split: str, why: str) -> LabelledSourceError:
    return LabelledSourceError(
        f"data '{root}' is neither an image folder ({split}/<class>/*.JPEG) nor a clip source ({split}/<class>/*.mp4, "
        f"or a manifest {split}.csv / {split}.txt of '<path> <label>' lines or a CSV with a path column): {why}")


def find_labelled_source(root: str | Path, split: str) -> SourceLayout:
    """The one place that tells what ``root`` holds for ``split`` (see the module docstring); raises
    ``LabelledSourceError`` naming the path when it holds neither images nor clips."""
    from .folder import IMAGE_EXTENSIONS

    root = Path(root)
    if not str(root) or not root.exists():
        raise _neither(root, split, "it does not exist")
    for suffix in MANIFEST_SUFFIXES:
        if (root / f"{split}{suffix}").is_file():
            return SourceLayout("clips", root / f"{split}{suffix}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise _neither(root, split, f"it has no '{split}/' folder and no {split}.csv / {split}.txt manifest")
    class_dirs = sorted(entry.path for entry in os.scandir(split_dir) if entry.is_dir())
    if not class_dirs:
        raise _neither(root, split, f"'{split_dir}' holds no class folders")
    video_extensions = None
    for class_dir in class_dirs:
        suffixes = {Path(entry.name).suffix.lower() for entry in os.scandir(class_dir) if entry.is_file()}
        if suffixes & set(IMAGE_EXTENSIONS):
            return SourceLayout("images", root)
        if video_extensions is None:
            from .video import VIDEO_EXTENSIONS as video_extensions  # decord is needed only for video
        if suffixes & set(video_extensions):
            return SourceLayout("clips", split_dir)
    raise _neither(root, split, f"the class folders of '{split_dir}' hold no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                f"and no videos ({', '.join(video_extensions)})")


def manifest_columns(path: str | Path) -> list[str] | None:
    """The label columns of a CSV manifest (every header cell but ``path``); None for a ``<path> <label>`` list."""
    with open(path) as handle:
        for line in handle:
            if line.strip() and not line.lstrip().startswith("#"):
                cells = [cell.strip() for cell in line.split(",")]
                return [cell for cell in cells if cell != "path"] if "path" in cells else None
    return None


def default_label_column(layout: SourceLayout) -> str:
    """'label': the one label of a ``<path> <label>`` list or a CSV with a ``label`` column; a CSV without one has
    no default (the error lists its columns)."""
    columns = manifest_columns(layout.path)
    if columns is None or "label" in columns:
        return "label"
    listed = ",".join(c for c in columns if c != "source")
    raise LabelledSourceError(f"manifest '{layout.path}' has label columns {columns} and none is called 'label': name "
                              f"the ones to evaluate, e.g. features.label_columns=[{listed}]")


class ClipCrops:
    """(num_clips, C, T, H, W) uint8 clips, short side already ``size`` -> (num_clips * num_crops, C, T, size, size)
    float views normalised with the ImageNet statistics, clip-major; crops evenly spaced along the long side (one: the
    centre; three: both ends and the centre)."""

    def __init__(self, size: int, num_crops: int):
        self.size, self.num_crops = size, num_crops
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)

    def offsets(self, length: int) -> list[int]:
        if self.num_crops == 1:
            return [(length - self.size) // 2]
        return [round(i * (length - self.size) / (self.num_crops - 1)) for i in range(self.num_crops)]

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        height, width = clips.shape[-2:]
        size = self.size
        if min(height, width) != size:
            raise ValueError(f"clips of {height}x{width} pixels: expected the short side resized to {size}")
        if width >= height:
            top = (height - size) // 2
            crops = [clips[..., top:top + size, left:left + size] for left in self.offsets(width)]
        else:
            left = (width - size) // 2
            crops = [clips[..., top:top + size, left:left + size] for top in self.offsets(height)]
        views = torch.stack(crops, dim=1).flatten(0, 1)  # (num_clips * num_crops, C, T, size, size)
        return (views.float() / 255 - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"ClipCrops(short side {self.size} bicubic antialiased, {self.num_crops} crops of {self.size}x"
                f"{self.size} along the long side, ImageNet-normalised)")


class ClipViews(LabelledSource):
    """The videos of a clip source (manifest or class folders), each seen as ``ClipSettings.num_views`` views:
    ``num_clips`` uniformly placed clips x ``num_crops`` crops. ``source[i]['image']`` is (V, C, T, S, S) float
    (V = num_clips * num_crops, clip-major), None for a skipped video; the fingerprint records the clip spec and the
    crops."""

    def __init__(self, path: str | Path, img_size: int, settings: ClipSettings, label_column: str = "label",
                 classes: list[str] | None = None, on_corrupt: str = "raise", indices: list[int] | None = None,
                 num_threads: int = 1):
        from torchvision.transforms import InterpolationMode, v2

        from .video import VideoClipDataset

        short_side = v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.clips = VideoClipDataset(path, short_side, frames_per_clip=settings.frames_per_clip,
                                      frame_step=settings.frame_step, num_clips=settings.num_clips, sampling="uniform",
                                      label_column=label_column, classes=classes, on_corrupt=on_corrupt,
                                      num_threads=num_threads, indices=indices)
        self.samples, self.classes, self.location = self.clips.samples, self.clips.classes, self.clips.location
        self.settings, self.label_column = settings, label_column
        self.transform = ClipCrops(img_size, settings.num_crops)

    @property
    def num_views(self) -> int:
        return self.settings.num_views

    def sample_record(self, sample: tuple) -> str:
        return f"{self.clips.sample_record(sample)}|crops={self.settings.num_crops}"

    def subset(self, indices: list[int]) -> "ClipViews":
        out = copy.copy(self)
        out.clips = self.clips.subset(indices)
        out.samples = out.clips.samples
        return out

    def __getitem__(self, key) -> dict:
        item = self.clips[key]
        if item["image"] is not None:
            clips = item["image"]
            item["image"] = self.transform(clips if clips.dim() == 5 else clips[None])
        return item


def open_labelled_source(root: str | Path, split: str, transform: Callable | int, on_corrupt: str = "raise",
                         indices: list[int] | None = None, *, clips: ClipSettings | None = None,
                         label_column: str | None = None, classes: list[str] | None = None) -> LabelledSource:
    """The labelled source of a ``--data`` value for ``split`` (``find_labelled_source`` tells which kind).

    ``transform``: an int is the deterministic eval view at that size (images: resize + center crop; clips: short
    side resized, ``clips.num_crops`` crops); a callable is the image transform of an image folder. Clip sources need
    ``clips`` (clip length, step, views); ``label_column`` names a manifest's label column (None: 'label', see
    ``default_label_column``); ``classes`` fixes the class list (an image folder's default is its train split's,
    ``data.folder.root_classes``; a clip source's val takes train's from the caller)."""
    layout = find_labelled_source(root, split)
    if layout.kind == "images":
        from .folder import ImageFolderDataset  # data.folder subclasses LabelledSource

        if label_column is not None:
            raise LabelledSourceError(f"data '{root}' is an image folder: its one label is the class folder, so it "
                                      f"has no label column '{label_column}' (label columns name CSV manifest columns)")
        view = eval_transform(transform) if isinstance(transform, int) else transform
        return ImageFolderDataset(root, split, view, on_corrupt=on_corrupt, indices=indices, classes=classes)
    if clips is None:
        raise LabelledSourceError(f"data '{root}' is a clip source ({layout.path}): reading it needs clip settings "
                                  f"(frames per clip, frame step)")
    if not isinstance(transform, int):
        raise LabelledSourceError(f"data '{root}' is a clip source: its view is given by a size (short side and "
                                  f"crops), got the transform {transform!r}")
    if label_column is not None and not layout.is_manifest:
        raise LabelledSourceError(f"data '{root}': '{layout.path}' is a folder of class folders: its one label is "
                                  f"the class folder, so it has no label column '{label_column}' (label columns name "
                                  f"CSV manifest columns)")
    if layout.is_manifest:
        label_column = label_column if label_column is not None else default_label_column(layout)
    return ClipViews(layout.path, transform, clips, label_column or "label", classes, on_corrupt, indices)


def per_class_subset(labels: list[int], per_class: int, seed: int) -> list[int] | None:
    """Indices of ``per_class`` random samples of each class (all of a smaller class; None: all samples)."""
    if per_class <= 0:
        return None
    return per_class_choice(labels, per_class, seed, allow_fewer=True)


def collate_labelled(items: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Items -> (pixels (B, ...), labels (B,)), skipped items dropped; None when every item was skipped (each was
    logged with its file; the consumer, e.g. ``eval.features.encode_batches``, passes over such a batch)."""
    kept = [item for item in items if item["image"] is not None]
    if not kept:
        return None
    return torch.stack([item["image"] for item in kept]), torch.tensor([item["label"] for item in kept])


def labelled_loader(source: LabelledSource, batch_size: int, num_workers: int, pin_memory: bool = False):
    """``(pixels, labels)`` batches of a source in its order (skipped files dropped; None for a batch of skipped
    files only)."""
    return torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate_labelled, pin_memory=pin_memory)


def build_labelled_loader(root: str, split: str, img_size: int, per_class: int = 0, batch_size: int = 256,
                          num_workers: int = 2, seed: int = 0, on_corrupt: str = "skip"):
    """Deterministic (resize + center crop) loader of ``(images, labels)`` over a split or a fixed subset."""
    source = open_labelled_source(root, split, eval_transform(img_size), on_corrupt)
    indices = per_class_subset(source.labels, per_class, seed)
    if indices is not None:
        source = source.subset(indices)
    return labelled_loader(source, batch_size, num_workers, pin_memory=torch.cuda.is_available())
