"""Weighted kNN classification (the DINO protocol): cosine similarity between L2-normalised features, the k
nearest train samples vote for their class with weight exp(similarity / T)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import topk_correct


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
