"""What the linear and attentive probes share: the held-out selection split, top-k accuracy, the
(learning rate × weight decay) grid, the selected / best-of-grid summary and its table and records."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from data.subsets import per_class_shuffled

from .results import Record, format_table, pct

if TYPE_CHECKING:
    from .tasks import EvalRun


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices) of a labels (N,) tensor: ``fraction`` of each class held out (at least one
    sample of every class with two or more)."""
    fit, held = [], []
    for members in per_class_shuffled(labels, seed):
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


def grid_records(run: "EvalRun", result: GridResult, label: str | None = None) -> list[Record]:
    """Print the grid and the selected / best-of-grid heads; records ``top{1,5}_{selected,best_of_grid}`` (with
    ``label`` in their config when a label column is named)."""
    sel, best = result.selected_head, result.best_head
    named = f" (label {label})" if label is not None else ""
    run.say(format_table(
        [(f"{h['lr']:g}", f"{h['weight_decay']:g}", pct(h["holdout_top1"]), pct(h["val_top1"]), pct(h["val_top5"]),
          ("selected" if i == result.selected else "") + (" best-of-grid" if i == result.best_of_grid else ""))
         for i, h in enumerate(result.heads)],
        ("lr", "wd", "held-out top-1 %", "val top-1 %", "val top-5 %", "")))
    run.say(format_table([("top-1 (selected on held-out train)", pct(sel["val_top1"]),
                           f"lr={sel['lr']:g} wd={sel['weight_decay']:g}"),
                          ("top-5 (selected on held-out train)", pct(sel["val_top5"]), ""),
                          ("top-1 best-of-grid (chosen on val: optimistic)", pct(best["val_top1"]),
                           f"lr={best['lr']:g} wd={best['weight_decay']:g}")],
                         (f"{run.task} probe{named}", "val %", "head")))
    head = lambda h: {"lr": h["lr"], "weight_decay": h["weight_decay"]}  # noqa: E731
    return [run.record("top1_selected", sel["val_top1"], label=label, head=head(sel)),
            run.record("top5_selected", sel["val_top5"], label=label, head=head(sel)),
            run.record("top1_best_of_grid", best["val_top1"], label=label, head=head(best)),
            run.record("top5_best_of_grid", best["val_top5"], label=label, head=head(best))]


def label_summary(run: "EvalRun", results: list[tuple[str | None, GridResult]]) -> None:
    """With several label columns, one table naming each: selected top-1 / top-5 and best-of-grid top-1."""
    if len(results) < 2:
        return
    run.say(format_table([(str(label), pct(r.selected_head["val_top1"]), pct(r.selected_head["val_top5"]),
                           pct(r.best_head["val_top1"])) for label, r in results],
                         ("label", "top-1 % (selected)", "top-5 % (selected)", "top-1 % (best-of-grid)")))
