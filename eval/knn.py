"""Weighted kNN classification (the DINO protocol): cosine similarity between L2-normalised features, the k
nearest train samples vote for their class with weight exp(similarity / T). The one kNN of the project: the
``knn`` eval task (below) and the training monitor (``eval.monitor``) both use it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jepa.config import knob

from .grid import topk_correct
from .results import Record, format_table, pct
from .tasks import EvalRun, register_task


@dataclass
class KNNConfig:
    ks: list[int] = knob(factory=lambda: [10, 20, 200], gt=0)
    temperature: float = knob(0.07, gt=0)


@torch.no_grad()
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               ks: list[int], temperature: float = 0.07, chunk: int = 1024) -> dict[int, torch.Tensor]:
    """bank (N, F), bank_labels (N,), queries (M, F) (normalised here) -> {k: class scores (M, C)}.

    The neighbours are searched once for the largest k (capped at N) and reused for the smaller ones.
    """
    bank = F.normalize(bank.float(), dim=-1)
    queries = F.normalize(queries.float(), dim=-1)
    k_max = min(max(ks), bank.shape[0])
    scores = {k: [] for k in ks}
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(k_max, dim=1)  # sorted, most similar first
        weights = (top_sim / temperature).exp()
        neighbour_labels = bank_labels[top_idx]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            scores[k].append(votes)
    return {k: torch.cat(parts) for k, parts in scores.items()}


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, ks: list[int], temperature: float = 0.07) -> dict[int, dict[str, float]]:
    """{k: {'top1': fraction, 'top5': fraction}}."""
    scores = knn_scores(bank, bank_labels, queries, num_classes, ks, temperature)
    return {k: dict(top1=topk_correct(s, query_labels, 1).float().mean().item(),
                    top5=topk_correct(s, query_labels, 5).float().mean().item()) for k, s in scores.items()}


@register_task("knn", config=KNNConfig)
def run_knn(run: EvalRun) -> list[Record]:
    """Weighted kNN on mean-pooled features: top-1 / top-5 for every k."""
    sets = run.labelled()
    if not run.accelerator.is_main_process:
        return []
    c = run.section
    device = run.accelerator.device
    named = any(s.label is not None for s in sets)
    rows, records = [], []
    for s in sets:
        train, val = s.train, s.val
        acc = knn_accuracy(train.features.to(device), train.labels.to(device), val.features.to(device),
                           val.labels.to(device), len(train.classes), c.ks, c.temperature)
        rows += [((str(s.label),) if named else ()) + (str(k), pct(v["top1"]), pct(v["top5"])) for k, v in acc.items()]
        for k, v in acc.items():
            records += [run.record(f"top1@k={k}", v["top1"], label=s.label),
                        run.record(f"top5@k={k}", v["top5"], label=s.label)]
    run.say(format_table(rows, (("label",) if named else ()) + ("k", "top-1 %", "top-5 %")))
    return records
