"""Evaluation results: JSON records appended to ``<out>/results.jsonl``, a printed table, and the plots a person
would rather look at (low-shot accuracy vs shots with error bars; the linear probe's confusion matrix)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class Record:
    task: str  # linear | attentive | knn | lowshot
    data: str
    encoder: str
    metric: str  # e.g. top1_selected, top1_best_of_grid, top1@k=20, top1@13shot_mean
    value: float
    seed: int
    config: dict = field(default_factory=dict)
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))


def append_records(out_dir: str | Path, records: list[Record]) -> Path:
    path = Path(out_dir) / "results.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for record in records:
            fh.write(json.dumps(asdict(record)) + "\n")
    return path


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def pct(fraction: float) -> str:
    """0.4321 -> '43.21' (tables print percentages)."""
    return f"{100 * fraction:.2f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lowshot(summary: dict[int, tuple[float, float, int]], path: str | Path, title: str) -> Path:
    """summary {shots: (mean top-1, std, seeds)} -> PNG of accuracy (%) vs shots per class with error bars."""
    plt = _pyplot()
    shots = sorted(summary)
    means = [100 * summary[k][0] for k in shots]
    stds = [100 * summary[k][1] for k in shots]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.errorbar(shots, means, yerr=stds, marker="o", capsize=4)
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes).numpy()


def plot_confusion(matrix: np.ndarray, classes: list[str], path: str | Path, title: str) -> Path:
    plt = _pyplot()
    size = min(12, 2 + 0.4 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size), dpi=120)
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 50:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), classes, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
