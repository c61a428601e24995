"""Low-shot evaluation (the MSN / I-JEPA protocol): L2-regularised multinomial logistic regression on frozen,
L2-normalised pooled features; the regularisation strength chosen by stratified cross-validation on the
labelled shots only (never on val). With one shot per class no fold can hold a class out and keep it in
training, so ``default_lambda`` is used and the record says so.

- k-shot: exactly k train images per class, for several seeds: mean ± std (sample std, ddof=1) of val top-1.
- subset file: the labelled set given by a SimCLR-format split file (ImageNet 1% / 10%, see ``eval.splits``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .grid import topk_correct


def sample_k_shot(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted indices (C*k,) of exactly ``k`` samples of each class of labels (N,), the same for the same seed."""
    rng = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    picked = []
    for label in np.unique(labels_np):
        members = np.flatnonzero(labels_np == label)
        if len(members) < k:
            raise ValueError(f"lowshot.shots has {k} but class {int(label)} has only {len(members)} train images")
        picked += rng.choice(members, size=k, replace=False).tolist()
    return torch.tensor(sorted(picked), dtype=torch.long)


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float, max_iter: int = 300
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean CE(x W + b, y) + lam/2 ||W||^2 by full-batch L-BFGS. x (N, F), y (N,) -> W (F, C), b (C,)."""
    x = x.float()
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * lam * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """(N,) fold id of each sample: each class's samples dealt round-robin over ``folds`` after a shuffle."""
    rng = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    fold = np.zeros(len(labels_np), dtype=np.int64)
    for label in np.unique(labels_np):
        members = rng.permutation(np.flatnonzero(labels_np == label))
        fold[members] = np.arange(len(members)) % folds
    return torch.from_numpy(fold)


def choose_lambda(x: torch.Tensor, y: torch.Tensor, num_classes: int, lambdas: list[float], folds: int,
                  default: float, seed: int = 0, max_iter: int = 300) -> tuple[float, str]:
    """(lambda, how it was chosen): the best mean cross-validated top-1 (ties: the stronger regularisation)."""
    folds = min(folds, int(torch.bincount(y, minlength=num_classes)[torch.unique(y)].min()))
    if folds < 2:
        return default, "default (one labelled sample per class: no cross-validation possible)"
    fold_of = stratified_folds(y, folds, seed)
    scores = []
    for lam in lambdas:
        correct = 0.0
        for fold in range(folds):
            train, test = fold_of != fold, fold_of == fold
            weight, bias = fit_logreg(x[train], y[train], num_classes, lam, max_iter)
            correct += topk_correct(x[test].float() @ weight + bias, y[test], 1).float().sum().item()
        scores.append(correct / len(y))
    best = max(range(len(lambdas)), key=lambda i: (scores[i], lambdas[i]))
    return lambdas[best], f"{folds}-fold cross-validation on the labelled set (top-1 {scores[best]:.4f})"


@dataclass
class LowShotRun:
    shots: int  # per class (0: a subset file)
    seed: int
    lam: float
    lam_selection: str
    num_labelled: int
    top1: float
    top5: float


def probe_subset(train_x: torch.Tensor, train_y: torch.Tensor, labelled: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, num_classes: int, lambdas: list[float], folds: int, default_lambda: float,
                 seed: int, max_iter: int = 300, shots: int = 0) -> LowShotRun:
    """Fit on train_x[labelled] (regularisation by CV on those rows only), score val. Features (N, F)."""
    x = F.normalize(train_x[labelled].float(), dim=-1)
    y = train_y[labelled]
    lam, how = choose_lambda(x, y, num_classes, lambdas, folds, default_lambda, seed, max_iter)
    weight, bias = fit_logreg(x, y, num_classes, lam, max_iter)
    logits = F.normalize(val_x.float(), dim=-1) @ weight + bias
    return LowShotRun(shots, seed, lam, how, len(labelled), topk_correct(logits, val_y, 1).float().mean().item(),
                      topk_correct(logits, val_y, 5).float().mean().item())


def k_shot_sweep(train_x, train_y, val_x, val_y, num_classes: int, shots: list[int], seeds: list[int],
                 lambdas: list[float], folds: int, default_lambda: float, max_iter: int = 300) -> list[LowShotRun]:
    runs = []
    for k in shots:
        for seed in seeds:
            labelled = sample_k_shot(train_y, k, seed)
            runs.append(probe_subset(train_x, train_y, labelled, val_x, val_y, num_classes, lambdas, folds,
                                     default_lambda, seed, max_iter, shots=k))
    return runs


def summarise_runs(runs: list[LowShotRun]) -> dict[int, tuple[float, float, int]]:
    """{shots: (mean top-1, sample std of top-1, number of seeds)}."""
    out = {}
    for k in sorted({r.shots for r in runs}):
        values = np.array([r.top1 for r in runs if r.shots == k])
        out[k] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values))
    return out
