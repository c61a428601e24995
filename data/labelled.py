"""Labelled loaders (deterministic eval transform) for monitors and evaluation."""
from __future__ import annotations

import numpy as np
import torch

from .folder import ImageFolderDataset
from .transforms import eval_transform


def per_class_subset(labels: list[int], per_class: int, seed: int) -> list[int] | None:
    """Indices of ``per_class`` random samples of each class (None: all samples)."""
    if per_class <= 0:
        return None
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        picked += rng.choice(members, size=min(per_class, len(members)), replace=False).tolist()
    return sorted(picked)


def build_labelled_loader(root: str, split: str, img_size: int, per_class: int = 0, batch_size: int = 256,
                          num_workers: int = 2, seed: int = 0, on_corrupt: str = "skip"):
    """Deterministic (resize + center crop) loader of ``(images, labels)`` over a split or a fixed subset."""
    transform = eval_transform(img_size)
    full = ImageFolderDataset(root, split, transform, on_corrupt=on_corrupt)
    dataset = ImageFolderDataset(root, split, transform, on_corrupt=on_corrupt,
                                 indices=per_class_subset(full.labels, per_class, seed))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate_labelled, pin_memory=torch.cuda.is_available())


def collate_labelled(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    kept = [item for item in items if item["image"] is not None]
    return torch.stack([item["image"] for item in kept]), torch.tensor([item["label"] for item in kept])
