"""Linear probe on cached pooled features: BatchNorm (no affine) + linear, a grid of learning rates × weight
decays trained in one pass as parallel heads (SGD + momentum, cosine schedule), the head selected on a held-out
part of the train split."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from jepa.config import knob

from .grid import GridResult, grid, grid_records, label_summary, scheduled_step, stratified_holdout, summarise
from .results import Record, confusion_matrix, pct, plot_confusion
from .tasks import EvalRun, register_task


@dataclass
class LinearConfig:
    lrs: list[float] = knob(factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0], gt=0)
    weight_decays: list[float] = knob(factory=lambda: [0.0, 0.0005, 0.005], ge=0)
    epochs: int = knob(50, gt=0)
    batch_size: int = knob(256, gt=0)
    momentum: float = knob(0.9, ge=0)
    holdout_fraction: float = knob(0.1, gt=0, lt=1)  # part of the train split kept out for selecting the head


class ParallelLinearHeads(nn.Module):
    """features (B, F) -> BatchNorm1d(affine=False) -> H independent linear heads -> logits (H, B, C).
    The norm has no parameters, so sharing it leaves the heads independent."""

    def __init__(self, dim: int, num_classes: int, num_heads: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.norm(features)
        return torch.stack([head(x) for head in self.heads])


@torch.no_grad()
def _logits(model: ParallelLinearHeads, features: torch.Tensor, device, chunk: int = 8192) -> torch.Tensor:
    model.eval()
    out = [model(features[i:i + chunk].to(device).float()).cpu() for i in range(0, len(features), chunk)]
    return torch.cat(out, dim=1) if out else torch.empty(len(model.heads), 0, model.heads[0].out_features)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, cfg: LinearConfig, seed: int = 0, device: str | torch.device = "cpu"
                 ) -> GridResult:
    """train_x (N, F), train_y (N,), val_x (M, F), val_y (M,) -> per-head accuracies, selection, predictions."""
    device = torch.device(device)
    fit_idx, held_idx = stratified_holdout(train_y, cfg.holdout_fraction, seed)
    settings = grid(cfg.lrs, cfg.weight_decays)
    torch.manual_seed(seed)
    model = ParallelLinearHeads(train_x.shape[1], num_classes, len(settings)).to(device)
    groups = [dict(params=head.parameters(), lr=lr, weight_decay=wd, base_lr=lr)
              for head, (lr, wd) in zip(model.heads, settings)]
    optimizer = torch.optim.SGD(groups, momentum=cfg.momentum)
    fit_x, fit_y = train_x[fit_idx], train_y[fit_idx]
    steps_per_epoch = max(1, -(-len(fit_idx) // cfg.batch_size))
    total, step = cfg.epochs * steps_per_epoch, 0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(fit_idx), generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            x, y = fit_x[batch].to(device).float(), fit_y[batch].to(device)
            logits = model(x)  # (H, B, C)
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(settings)), reduction="sum") / len(batch)
            scheduled_step(optimizer, loss, step, total)
            step += 1
    held = _logits(model, train_x[held_idx], device)
    val = _logits(model, val_x, device)
    return summarise(settings, list(held), train_y[held_idx], list(val), val_y)


@register_task("linear", config=LinearConfig)
def run_linear(run: EvalRun) -> list[Record]:
    """Linear probe (BatchNorm + linear, lr x wd grid) on pooled features; confusion matrix plot."""
    sets = run.labelled()
    if not run.accelerator.is_main_process:
        return []
    records, results = [], []
    for s in sets:
        train, val = s.train, s.val
        result = linear_probe(train.features, train.labels, val.features, val.labels, len(train.classes),
                              run.section, run.cfg.seed, run.accelerator.device)
        records += grid_records(run, result, s.label)
        results.append((s.label, result))
        matrix = confusion_matrix(val.labels, result.val_predictions, len(train.classes))
        name = "confusion_linear.png" if s.label is None else f"confusion_linear_{s.label}.png"
        path = plot_confusion(matrix, train.classes, run.out / name,
                              f"linear probe, {run.encoder.name}{'' if s.label is None else f', {s.label}'}\n"
                              f"val top-1 {pct(result.selected_head['val_top1'])}%")
        run.say(f"confusion matrix: {path}")
    label_summary(run, results)
    return records
