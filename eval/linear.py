"""Linear probe on cached pooled features: BatchNorm (no affine) + linear, a grid of learning rates × weight
decays trained in one pass as parallel heads (SGD + momentum, cosine schedule), the head selected on a held-out
part of the train split."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LinearConfig
from .grid import GridResult, grid, scheduled_step, stratified_holdout, summarise


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
