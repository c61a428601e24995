"""What the linear and attentive probes share: the held-out selection split, top-k accuracy, the
(learning rate × weight decay) grid, and the selected / best-of-grid summary."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices) of a labels (N,) tensor: ``fraction`` of each class held out (at least one
    sample of every class with two or more)."""
    rng = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    fit, held = [], []
    for label in np.unique(labels_np):
        members = rng.permutation(np.flatnonzero(labels_np == label))
        count = min(len(members) - 1, max(1, int(round(fraction * len(members))))) if len(members) > 1 else 0
        held += members[:count].tolist()
        fit += members[count:].tolist()
    return torch.tensor(sorted(fit), dtype=torch.long), torch.tensor(sorted(held), dtype=torch.long)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """logits (N, C), labels (N,) -> (N,) bool: label among the top-min(k, C) scores."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == labels[:, None]).any(-1)


def grid(lrs: list[float], weight_decays: list[float]) -> list[tuple[float, float]]:
    return list(itertools.product(lrs, weight_decays))


def cosine_factor(step: int, total: int, warmup: int = 0) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def scheduled_step(optimizer, loss, step: int, total: int, warmup: int = 0) -> None:
    """One optimizer step at ``base_lr * cosine_factor(step, total, warmup)`` for every parameter group."""
    factor = cosine_factor(step, total, warmup)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@dataclass
class GridResult:
    """Per head: ``lr``, ``weight_decay``, ``holdout_top1``, ``val_top1``, ``val_top5`` (fractions).
    ``selected``: the head with the best held-out top-1 (ties: first in grid order); ``best_of_grid``: the
    head with the best val top-1 (an optimistic number, reported separately)."""

    heads: list[dict]
    selected: int
    best_of_grid: int
    val_predictions: torch.Tensor = field(repr=False)  # (M,) the selected head's val predictions

    @property
    def selected_head(self) -> dict:
        return self.heads[self.selected]

    @property
    def best_head(self) -> dict:
        return self.heads[self.best_of_grid]


def summarise(settings: list[tuple[float, float]], holdout_logits: list[torch.Tensor], holdout_labels: torch.Tensor,
              val_logits: list[torch.Tensor], val_labels: torch.Tensor) -> GridResult:
    heads = []
    for (lr, wd), hold, val in zip(settings, holdout_logits, val_logits):
        heads.append(dict(lr=lr, weight_decay=wd,
                          holdout_top1=topk_correct(hold, holdout_labels, 1).float().mean().item(),
                          val_top1=topk_correct(val, val_labels, 1).float().mean().item(),
                          val_top5=topk_correct(val, val_labels, 5).float().mean().item()))
    selected = max(range(len(heads)), key=lambda i: (heads[i]["holdout_top1"], -i))
    best = max(range(len(heads)), key=lambda i: (heads[i]["val_top1"], -i))
    return GridResult(heads, selected, best, val_logits[selected].argmax(-1).cpu())
