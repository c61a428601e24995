"""A run's health at a glance: loss terms, kNN accuracy and the collapse monitor's rank / std, from the run's
TensorBoard events, in one PNG.

    path = plot_health("runs/lejepa")            # -> runs/lejepa/health.png
    python -m eval.health_plot runs/lejepa [--out x.png] [--title TEXT]

Reads every ``events.out.tfevents.*`` under the run folder (a resumed run writes several; where two hold the same
step, the later-written value wins, so steps replayed after a resume are drawn once).
"""
from __future__ import annotations

import argparse
from pathlib import Path

PANELS = (  # (title, which tags, y label)
    ("loss", lambda tag: tag == "train/loss" or tag.endswith("_loss") or tag == "train/sigreg", "loss"),
    ("kNN monitor", lambda tag: tag.startswith("monitor/"), "top-1"),
    ("collapse: effective rank (RankMe)", lambda tag: tag.startswith("collapse/") and tag.endswith("_rank"), "rank"),
    ("collapse: feature std", lambda tag: tag.startswith("collapse/") and tag.endswith("_std"), "std"),
)


def read_scalars(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (steps, values)} of every scalar in the run's events, sorted by step, one value per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall time, value)
    for file in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})  # 0: keep every event
        events.Reload()
        for tag in events.Tags()["scalars"]:
            by_step = latest.setdefault(tag, {})
            for event in events.Scalars(tag):
                if event.step not in by_step or event.wall_time >= by_step[event.step][0]:
                    by_step[event.step] = (event.wall_time, event.value)
    return {tag: ([s for s in sorted(v)], [v[s][1] for s in sorted(v)]) for tag, v in latest.items()}


def plot_health(run_dir: str | Path, out: str | Path | None = None, title: str = "") -> Path:
    """Write the 2x2 health figure of ``run_dir`` (default ``<run_dir>/health.png``); returns its path. Raises
    FileNotFoundError when the folder holds no scalar events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(run_dir)
    if not scalars:
        raise FileNotFoundError(f"'{run_dir}' holds no TensorBoard scalar events (events.out.tfevents.*)")
    out = Path(out) if out is not None else Path(run_dir) / "health.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, wanted, ylabel) in zip(axes.flat, PANELS):
        tags = sorted(tag for tag in scalars if wanted(tag))
        for tag in tags:
            steps, values = scalars[tag]
            ax.plot(steps, values, "o-" if len(steps) < 20 else "-", markersize=3, label=tag.split("/", 1)[-1])
        if name == "loss" and tags and all(v > 0 for tag in tags for v in scalars[tag][1]):
            values = [v for tag in tags for v in scalars[tag][1]]
            if max(values) / min(values) > 30:
                ax.set_yscale("log")
        ax.set_title(name if tags else f"{name} (not logged)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if tags:
            ax.legend(fontsize=7)
    fig.suptitle(title or str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    print(f"wrote {plot_health(args.run_dir, args.out, args.title)}")


if __name__ == "__main__":
    main()
