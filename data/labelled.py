"""Labelled sources and their loaders (deterministic eval transform) for monitors and evaluation.

A ``LabelledSource`` is what evaluation and the training monitors read, whatever holds the data: image folders now
(``data.folder.ImageFolderDataset``); video manifests (clips) and caption / VQA pairs implement the same interface.
``open_labelled_source`` picks the source for a ``--data`` value; ``labelled_loader`` batches any source as
``(pixels, labels)``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from .subsets import per_class_choice
from .transforms import eval_transform


class LabelledSource(torch.utils.data.Dataset):
    """Labelled samples in a fixed order, and a fingerprint of them for the feature cache.

    - ``samples``: ``[(file path, label)]``; rows of every feature tensor follow this order;
    - ``classes``: the class names that labels index (a VQA source: its answer vocabulary);
    - ``labels``: the label of every sample;
    - ``transform``: what turns a decoded file into pixels (its ``repr`` is part of the feature cache key);
    - ``source[i]`` -> ``{'image': (3, H, W) image or (3, T, H, W) clip, or None for a skipped file, 'label': int,
      'index': int, ...}``; a source may add fields (a question's ``'text'``);
    - ``fingerprint()``: SHA-256 of the class names and of each sample's record (file path, label, size, mtime): it
      changes when a file, a label or a class changes. A source whose samples carry more than a file (a clip's time
      range, a caption) adds it in ``sample_record``.
    """

    samples: list[tuple[Path, int]]
    classes: list[str]
    transform: Callable

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [sample[1] for sample in self.samples]

    def __getitem__(self, key) -> dict:
        raise NotImplementedError(f"{type(self).__name__} does not implement __getitem__")

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


def open_labelled_source(root: str | Path, split: str, transform: Callable, on_corrupt: str = "raise",
                         indices: list[int] | None = None) -> LabelledSource:
    """The labelled source of a ``--data`` value: an ImageNet-style folder (``<root>/<split>/<class>/<image>``)."""
    from .folder import ImageFolderDataset  # data.folder subclasses LabelledSource

    return ImageFolderDataset(root, split, transform, on_corrupt=on_corrupt, indices=indices)


def per_class_subset(labels: list[int], per_class: int, seed: int) -> list[int] | None:
    """Indices of ``per_class`` random samples of each class (all of a smaller class; None: all samples)."""
    if per_class <= 0:
        return None
    return per_class_choice(labels, per_class, seed, allow_fewer=True)


def collate_labelled(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    kept = [item for item in items if item["image"] is not None]
    return torch.stack([item["image"] for item in kept]), torch.tensor([item["label"] for item in kept])


def labelled_loader(source: LabelledSource, batch_size: int, num_workers: int, pin_memory: bool = False):
    """``(pixels, labels)`` batches of a source in its order (skipped files dropped)."""
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
