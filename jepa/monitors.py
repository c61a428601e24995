"""Training monitors: kNN accuracy of the target encoder on a fixed labelled subset."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def pooled_features(encoder: nn.Module, loader: Iterable, device: torch.device,
                    autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled, L2-normalised last-layer features (N, D) float32 and labels (N,) of a labelled loader."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, batch_labels in loader:
        with autocast():
            tokens = encoder(images.to(device, non_blocking=True))
        feats.append(F.normalize(tokens.float().mean(1), dim=-1))
        labels.append(batch_labels.to(device))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Cosine kNN with exp(sim / T)-weighted votes (the DINO protocol).

    bank (N, D), queries (M, D): L2-normalised; returns class scores (M, num_classes).
    """
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


class KNNMonitor:
    """kNN (cosine, k, temperature) top-1 accuracy: bank = labelled train subset, queries = val subset."""

    name = "knn"

    def __init__(self, bank_loader: Iterable, query_loader: Iterable, num_classes: int, k: int = 20,
                 temperature: float = 0.07):
        self.bank_loader, self.query_loader = bank_loader, query_loader
        self.num_classes, self.k, self.temperature = num_classes, k, temperature

    def __call__(self, encoder: nn.Module, device: torch.device, autocast=contextlib.nullcontext) -> float:
        bank, bank_labels = pooled_features(encoder, self.bank_loader, device, autocast)
        queries, query_labels = pooled_features(encoder, self.query_loader, device, autocast)
        scores = knn_predict(bank, bank_labels, queries, self.num_classes, self.k, self.temperature)
        return (scores.argmax(1) == query_labels).float().mean().item()
