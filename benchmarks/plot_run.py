"""Plot a run's loss curve (and kNN accuracy) from its TensorBoard events into a PNG.

    python benchmarks/plot_run.py <events file or run dir> <out.png> [--title TEXT]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(path: Path, tag: str) -> tuple[list[int], list[float]]:
    files = [path] if path.is_file() else sorted(path.rglob("events.out.tfevents.*"))
    steps, values = [], []
    for file in files:
        acc = EventAccumulator(str(file))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    return steps, values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("events", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    steps, loss = scalars(args.events, "train/loss")
    loss_ax.plot(steps, loss, color="tab:blue", label="train loss")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss", color="tab:blue")
    knn_steps, knn = scalars(args.events, "monitor/knn")
    if knn:
        knn_ax = loss_ax.twinx()
        knn_ax.plot(knn_steps, knn, "o-", color="tab:red", label="kNN top-1 (target encoder)")
        knn_ax.set_ylabel("kNN top-1", color="tab:red")
    loss_ax.set_title(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
