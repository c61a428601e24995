"""Seeded per-class sampling: the one place that groups samples by class and draws from each class.

- ``per_class_choice(labels, k, seed)``: k samples of every class (monitor banks, k-shot sets);
- ``per_class_shuffled(labels, seed)``: every class's samples in a seeded order (held-out splits, CV folds).

Both walk the classes in ascending label order with one ``numpy.random.default_rng(seed)``, so the same labels and
seed give the same picks on every machine. ``labels`` is anything ``numpy.asarray`` takes: a list, an array, or a
(CPU or device) tensor of shape (N,).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class TooFewSamplesError(ValueError):
    """A class holds fewer samples than asked for; ``label``, ``count`` and ``k`` say which and how many."""

    def __init__(self, label: int, count: int, k: int):
        super().__init__(f"class {label} has only {count} samples, fewer than the {k} asked for")
        self.label, self.count, self.k = label, count, k


def _as_numpy(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels)


def _classes(labels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for label in np.unique(labels):
        yield int(label), np.flatnonzero(labels == label)


def per_class_choice(labels, k: int, seed: int, allow_fewer: bool = False) -> list[int]:
    """Sorted indices of ``k`` distinct samples of each class, drawn without replacement. A class with fewer than
    ``k`` samples gives all of them when ``allow_fewer``, else raises ``TooFewSamplesError``."""
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for label, members in _classes(_as_numpy(labels)):
        if len(members) < k and not allow_fewer:
            raise TooFewSamplesError(label, len(members), k)
        picked += rng.choice(members, size=min(k, len(members)), replace=False).tolist()
    return sorted(picked)


def per_class_shuffled(labels, seed: int) -> Iterator[np.ndarray]:
    """Each class's sample indices (ascending label order) in a seeded random order."""
    rng = np.random.default_rng(seed)
    for _, members in _classes(_as_numpy(labels)):
        yield rng.permutation(members)
