"""Low-shot evaluation (the MSN / I-JEPA protocol): L2-regularised multinomial logistic regression on frozen,
L2-normalised pooled features; the regularisation strength chosen by stratified cross-validation on the
labelled shots only (never on val). With one shot per class no fold can hold a class out and keep it in
training, so ``default_lambda`` is used and the record says so.

- k-shot: exactly k train images per class, for several seeds: mean ± std (sample std, ddof=1) of val top-1.
- subset file: the labelled set given by a SimCLR-format split file (ImageNet 1% / 10%, see ``eval.splits``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.subsets import TooFewSamplesError, per_class_choice, per_class_shuffled
from jepa.config import ConfigError, knob

from .grid import topk_correct
from .results import Record, format_table, pct, plot_lowshot
from .splits import parse_split_file
from .tasks import EvalRun, register_task


@dataclass
class LowShotConfig:
    shots: list[int] = knob(factory=lambda: [1, 2, 5, 13], gt=0)
    seeds: list[int] = knob(factory=lambda: [0, 1, 2])
    split_file: str = ""  # SimCLR-format subset file (ImageNet 1% / 10%): replaces the k-shot sweep
    lambdas: list[float] = knob(factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], ge=0)  # L2 strengths
    default_lambda: float = knob(1e-3, ge=0)  # used where cross-validation is impossible (one shot per class)
    folds: int = knob(5, gt=0)  # at most; never more than the shots per class
    max_iter: int = knob(300, gt=0)  # L-BFGS iterations per fit


def sample_k_shot(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted indices (C*k,) of exactly ``k`` samples of each class of labels (N,), the same for the same seed."""
    try:
        picked = per_class_choice(labels, k, seed)
    except TooFewSamplesError as err:
        raise ValueError(f"lowshot.shots has {k} but class {err.label} has only {err.count} train images") from None
    return torch.tensor(picked, dtype=torch.long)


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
    fold = np.zeros(len(labels), dtype=np.int64)
    for members in per_class_shuffled(labels, seed):
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


@register_task("lowshot", config=LowShotConfig)
def run_lowshot(run: EvalRun) -> list[Record]:
    """Low-shot logistic regression: a k-shot sweep over seeds (mean ± std, plot), or a split file's subset."""
    c = run.section
    if c.split_file and run.clips is not None:
        raise ConfigError(f"config key 'lowshot.split_file' lists images of an image folder; --data '{run.data}' is "
                          f"a clip source (use the k-shot sweep, lowshot.shots)")
    indices = parse_split_file(c.split_file, run.data, "train") if c.split_file else None
    sets = run.labelled(train_indices=indices)
    if not run.accelerator.is_main_process:
        return []
    records = []
    for s in sets:
        records += _lowshot_label(run, s.label, s.train, s.val)
    return records


def _lowshot_label(run: EvalRun, label: str | None, train, val) -> list[Record]:
    c = run.section
    num_classes = len(train.classes)
    named = "" if label is None else f" (label {label})"
    if c.split_file:
        result = probe_subset(train.features, train.labels, torch.arange(len(train.labels)), val.features,
                              val.labels, num_classes, c.lambdas, c.folds, c.default_lambda, run.cfg.seed, c.max_iter)
        run.say(format_table([(Path(c.split_file).name, str(result.num_labelled), pct(result.top1),
                               pct(result.top5), f"{result.lam:g}", result.lam_selection)],
                             ("split file", "labelled", "top-1 %", "top-5 %", "lambda", "lambda chosen by")))
        extra = dict(split_file=str(c.split_file), num_labelled=result.num_labelled, lam=result.lam,
                     lam_selection=result.lam_selection)
        return [run.record("top1_split_file", result.top1, label=label, **extra),
                run.record("top5_split_file", result.top5, label=label, **extra)]
    runs = k_shot_sweep(train.features, train.labels, val.features, val.labels, num_classes, c.shots, c.seeds,
                        c.lambdas, c.folds, c.default_lambda, c.max_iter)
    summary = summarise_runs(runs)
    run.say(format_table([(str(k), f"{100 * m:.2f} ± {100 * s:.2f}", str(n),
                           " ".join(f"{r.lam:g}" for r in runs if r.shots == k)) for k, (m, s, n) in summary.items()],
                         (f"shots/class{named}", "val top-1 % (mean ± std)", "seeds", "lambda per seed")))
    records = [run.record(f"top1@{r.shots}shot", r.top1, seed=r.seed, label=label, lam=r.lam,
                          lam_selection=r.lam_selection) for r in runs]
    for k, (mean, std, n) in summary.items():
        records += [run.record(f"top1@{k}shot_mean", mean, label=label, seeds=c.seeds),
                    run.record(f"top1@{k}shot_std", std, label=label, seeds=c.seeds)]
    path = plot_lowshot(summary, run.out / ("lowshot.png" if label is None else f"lowshot_{label}.png"),
                        f"low-shot logistic regression{named}\n{run.encoder.name} (mean ± std over {len(c.seeds)} "
                        f"seeds)")
    run.say(f"plot: {path}")
    return records
