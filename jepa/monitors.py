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


@torch.no_grad()
def effective_rank(features: torch.Tensor, max_rows: int = 2048) -> torch.Tensor:
    """RankMe (Garrido et al., 2023): exp(entropy of the normalised singular values) of (N, D) features."""
    rows = features.detach().float().reshape(-1, features.shape[-1])[:max_rows]
    singular = torch.linalg.svdvals(rows)
    p = singular / singular.sum().clamp_min(1e-12) + 1e-12
    return torch.exp(-(p * p.log()).sum())


class CollapseMonitor:
    """Per-dimension std and effective rank of predicted and target features, with a warning when a std falls
    under ``std_ratio`` of its first value or a rank drops by more than ``rank_drop`` of its first value.

    ``update(pred, target)`` (…, D) tensors -> ({'collapse/pred_std': ..., ...}, [warning strings]).
    """

    def __init__(self, std_ratio: float = 0.1, rank_drop: float = 0.3):
        self.std_ratio, self.rank_drop = std_ratio, rank_drop
        self.reference: dict[str, float] = {}

    def state_dict(self) -> dict:
        return dict(self.reference)

    def load_state_dict(self, state: dict) -> None:
        self.reference = dict(state)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[dict, list[str]]:
        stats = {}
        for name, features in (("pred", pred), ("target", target)):
            flat = features.detach().float().reshape(-1, features.shape[-1])
            stats[f"collapse/{name}_std"] = flat.std(0).mean().item()
            stats[f"collapse/{name}_rank"] = effective_rank(flat).item()
        warnings = []
        for key, value in stats.items():
            first = self.reference.setdefault(key, value)
            if key.endswith("_std") and value < self.std_ratio * first:
                warnings.append(f"{key} fell to {value:.4g}, under {self.std_ratio} x its first value {first:.4g}")
            if key.endswith("_rank") and value < (1 - self.rank_drop) * first:
                warnings.append(f"{key} dropped to {value:.1f} from {first:.1f} (more than {self.rank_drop:.0%})")
        return stats, warnings
