"""Attentive probe (V-JEPA style) on cached tokens: a learnable query cross-attends to the frozen tokens, a
linear layer classifies the pooled vector. Depth 1: one cross-attention block; depth 4: three self-attention
blocks over the tokens first (V-JEPA 2's probe), then the cross-attention block. The (lr × weight decay) grid
trains in one pass as parallel probes (AdamW, warmup + cosine); selection on a held-out part of train.

Clips: every video has V views (``features.num_clips`` x ``features.num_crops``), tokens (N, V, T, D). The probe
trains on every view of a training video as a sample of its own (the video's label); held-out and val predictions
average the softmax over a video's views, as V-JEPA evaluates. The held-out part is chosen by video, so no view of
a held-out video is trained on. With ``features.label_columns`` one probe grid per label column."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, Mlp

from jepa.config import ConfigError, knob

from .grid import GridResult, grid, grid_records, label_summary, scheduled_step, stratified_holdout, summarise
from .results import Record
from .tasks import EvalRun, register_task


@dataclass
class AttentiveConfig:
    depth: Literal[1, 4] = 1  # 1: one cross-attention block; 4: three self-attention blocks over the tokens, then it
    num_heads: int = knob(0, ge=0)  # 0: the most heads (<= 16) that divide the feature dim with head dim >= 32
    mlp_ratio: float = knob(4.0, gt=0)
    lrs: list[float] = knob(factory=lambda: [0.0001, 0.0003, 0.001], gt=0)
    weight_decays: list[float] = knob(factory=lambda: [0.01, 0.1], ge=0)
    epochs: int = knob(20, gt=0)
    batch_size: int = knob(128, gt=0)
    warmup_epochs: int = knob(1, ge=0)
    holdout_fraction: float = knob(0.1, gt=0, lt=1)


def default_num_heads(dim: int) -> int:
    """The most heads (<= 16) dividing ``dim`` with a head dim of at least 32 (1 if none)."""
    for heads in (16, 12, 8, 6, 4, 3, 2):
        if dim % heads == 0 and dim // heads >= 32:
            return heads
    return 1


class CrossAttentionBlock(nn.Module):
    """query (B, Q, D), tokens (B, T, D) -> (B, Q, D): q + xattn(q, norm(tokens)); q + mlp(norm(q))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        batch, num_q, dim = query.shape
        heads = self.num_heads
        q = self.q(self.norm_q(query)).view(batch, num_q, heads, -1).transpose(1, 2)
        k, v = self.kv(self.norm_kv(tokens)).view(batch, tokens.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, num_q, dim)
        query = query + self.proj(attended)
        return query + self.mlp(self.norm_mlp(query))


class AttentiveClassifier(nn.Module):
    """tokens (B, T, D) -> logits (B, C)."""

    def __init__(self, dim: int, num_classes: int, depth: int = 1, num_heads: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        num_heads = num_heads or default_num_heads(dim)
        if dim % num_heads:
            raise ConfigError(f"config key 'attentive.num_heads' ({num_heads}) must divide the feature dim {dim} of "
                              f"the encoder (0: a divisor chosen for it)")
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth - 1))
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.cross = CrossAttentionBlock(dim, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        pooled = self.cross(self.query.expand(tokens.shape[0], -1, -1), tokens)[:, 0]
        return self.head(self.norm(pooled))


def as_views(tokens: torch.Tensor) -> torch.Tensor:
    """(N, T, D) -> (N, 1, T, D); (N, V, T, D) as it is."""
    if tokens.dim() == 3:
        return tokens.unsqueeze(1)
    if tokens.dim() != 4:
        raise ValueError(f"attentive probe tokens of shape {tuple(tokens.shape)}: expected (N, T, D) or (N, V, T, D)")
    return tokens


@torch.no_grad()
def _predictions(probes: nn.ModuleList, tokens: torch.Tensor, device, chunk: int = 512) -> list[torch.Tensor]:
    """tokens (M, V, T, D) -> per probe (M, C): the logits of the one view, or the softmax averaged over V views."""
    probes.eval()
    views = tokens.shape[1]
    step = max(1, chunk // views)
    out = [[] for _ in probes]
    for start in range(0, len(tokens), step):
        x = tokens[start:start + step].to(device).float()
        for i, probe in enumerate(probes):
            logits = probe(x.flatten(0, 1)).float()
            if views > 1:
                logits = logits.softmax(-1).unflatten(0, (len(x), views)).mean(1)
            out[i].append(logits.cpu())
    return [torch.cat(parts) for parts in out]


def attentive_probe(train_tokens: torch.Tensor, train_y: torch.Tensor, val_tokens: torch.Tensor,
                    val_y: torch.Tensor, num_classes: int, cfg: AttentiveConfig, seed: int = 0,
                    device: str | torch.device = "cpu") -> GridResult:
    """train_tokens (N, T, D) or (N, V, T, D), val_tokens (M, T, D) or (M, V, T, D) (any float dtype), labels
    (N,), (M,). Every training view is a sample; held-out and val predictions average over a video's views."""
    device = torch.device(device)
    train_views, val_views = as_views(train_tokens), as_views(val_tokens)
    fit_idx, held_idx = stratified_holdout(train_y, cfg.holdout_fraction, seed)
    num_views = train_views.shape[1]
    sample_video = fit_idx.repeat_interleave(num_views)  # (len(fit_idx) * V,) every view of every fit video
    sample_view = torch.arange(num_views).repeat(len(fit_idx))
    settings = grid(cfg.lrs, cfg.weight_decays)
    torch.manual_seed(seed)
    dim = train_views.shape[-1]
    probes = nn.ModuleList(AttentiveClassifier(dim, num_classes, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
                           for _ in settings).to(device)
    optimizer = torch.optim.AdamW([dict(params=p.parameters(), lr=lr, weight_decay=wd, base_lr=lr)
                                   for p, (lr, wd) in zip(probes, settings)])
    steps_per_epoch = max(1, -(-len(sample_video) // cfg.batch_size))
    total, warmup, step = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, 0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        probes.train()
        order = torch.randperm(len(sample_video), generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            videos = sample_video[batch]
            x, y = train_views[videos, sample_view[batch]].to(device).float(), train_y[videos].to(device)
            loss = sum(F.cross_entropy(probe(x), y) for probe in probes)
            scheduled_step(optimizer, loss, step, total, warmup)
            step += 1
    held = _predictions(probes, train_views[held_idx], device)
    val = _predictions(probes, val_views, device)
    return summarise(settings, held, train_y[held_idx], val, val_y)


@register_task("attentive", config=AttentiveConfig)
def run_attentive(run: EvalRun) -> list[Record]:
    """Attentive probe (learnable query over every last-layer token, lr x wd grid) on cached fp16 tokens."""
    sets = run.labelled("tokens")
    if not run.accelerator.is_main_process:
        return []
    records, results = [], []
    for s in sets:
        result = attentive_probe(s.train.features, s.train.labels, s.val.features, s.val.labels,
                                 len(s.train.classes), run.section, run.cfg.seed, run.accelerator.device)
        records += grid_records(run, result, s.label)
        results.append((s.label, result))
    label_summary(run, results)
    return records
