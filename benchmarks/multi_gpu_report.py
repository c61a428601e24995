"""The tables of benchmarks/multi_gpu.sh from its logs: loss curves of 1 GPU / DDP / FSDP at equal global batch,
DDP scaling 1 -> 2 GPUs (ViT-B/16), DDP vs FSDP throughput and peak memory (ViT-H/14).

    python benchmarks/multi_gpu_report.py outputs/multi_gpu

A log line reads ``step N: loss X  lr ...  samples/s S  data wait W%  peak P GiB`` (train.py with
trainer.progress_bar=false): S is the global rate of the log window, P the main process's peak.
"""
from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

LINE = re.compile(r"^step (\d+): loss ([0-9.eE+-]+|nan|inf)\s.*samples/s (\d+)\s+data wait (\d+)%"
                  r"(?:\s+peak ([0-9.]+) GiB)?")
WINDOW = 20  # steps per loss window of the curve table
SKIP = 2  # throughput: the first log windows (compilation, cudnn autotuning, loader start) are left out


def read_log(path: Path) -> list[dict]:
    """[{step, loss, samples_s, data_wait, peak_gib}] of a train.py log; ValueError naming the log when it holds no
    step line (the run failed: its tail says why)."""
    rows = []
    for line in path.read_text().splitlines():
        match = LINE.match(line.strip())
        if match:
            step, loss, rate, wait, peak = match.groups()
            rows.append({"step": int(step), "loss": float(loss), "samples_s": int(rate), "data_wait": int(wait),
                         "peak_gib": float(peak) if peak else float("nan")})
    if not rows:
        raise ValueError(f"'{path}' has no 'step N: loss ...' line (see its end for the error)")
    return rows


def curve_table(out: Path) -> str:
    """Mean loss per window of WINDOW steps for each strategy, and the largest window difference to 1 GPU."""
    runs = {name: {r["step"]: r["loss"] for r in read_log(out / f"curve_{name}.log")}
            for name in ("1gpu", "ddp", "fsdp")}
    last = min(max(steps) for steps in runs.values())
    lines = ["| steps | 1 GPU x 256 | DDP 2 x 128 | FSDP 2 x 128 | DDP - 1 GPU | FSDP - 1 GPU |",
             "|---|---|---|---|---|---|"]
    worst = {"ddp": 0.0, "fsdp": 0.0}
    for start in range(1, last + 1, WINDOW):
        steps = range(start, min(start + WINDOW, last + 1))
        mean = {name: statistics.fmean(losses[s] for s in steps) for name, losses in runs.items()}
        for name in worst:
            worst[name] = max(worst[name], abs(mean[name] - mean["1gpu"]) / mean["1gpu"])
        lines.append(f"| {steps[0]}-{steps[-1]} | {mean['1gpu']:.4f} | {mean['ddp']:.4f} | {mean['fsdp']:.4f} | "
                     f"{mean['ddp'] - mean['1gpu']:+.4f} | {mean['fsdp'] - mean['1gpu']:+.4f} |")
    lines.append(f"\nlargest window difference to 1 GPU: DDP {100 * worst['ddp']:.1f}%, FSDP "
                 f"{100 * worst['fsdp']:.1f}% (different crops, masks and data shards: a few % is noise; a trend is "
                 f"a bug)")
    return "\n".join(lines)


def throughput(path: Path) -> dict:
    """Median global img/s, data wait and the largest main-GPU peak over the log windows after the first SKIP."""
    rows = read_log(path)
    steady = rows[SKIP:] or rows
    return {"samples_s": statistics.median(r["samples_s"] for r in steady),
            "data_wait": statistics.median(r["data_wait"] for r in steady),
            "peak_gib": max(r["peak_gib"] for r in rows)}


def throughput_table(out: Path, runs: list[tuple[str, str, int]], baseline: str) -> str:
    """One row per (log name, label, GPUs): global and per-GPU img/s, ratio to ``baseline``'s per-GPU rate, data
    wait, peak GiB of the main GPU."""
    measured = {name: throughput(out / f"{name}.log") for name, _, _ in runs}
    base = measured[baseline]["samples_s"] / dict((n, g) for n, _, g in runs)[baseline]
    lines = ["| run | GPUs | img/s | img/s per GPU | per GPU vs baseline | data wait | peak GiB / GPU |",
             "|---|---|---|---|---|---|---|"]
    for name, label, gpus in runs:
        m = measured[name]
        lines.append(f"| {label} | {gpus} | {m['samples_s']:,.0f} | {m['samples_s'] / gpus:,.0f} | "
                     f"{m['samples_s'] / gpus / base:.2f} | {m['data_wait']:.0f}% | {m['peak_gib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "outputs/multi_gpu")
    print("## Loss curves at global batch 256 (ViT-S/16, 128 px, 200 steps)\n")
    print(curve_table(out))
    print("\n## DDP scaling (ViT-B/16, 224 px, batch 128 per GPU; scaling efficiency = per GPU vs baseline)\n")
    print(throughput_table(out, [("b16_1gpu", "1 GPU", 1), ("b16_ddp", "DDP", 2)], "b16_1gpu"))
    print("\n## DDP vs FSDP (ViT-H/14, 224 px, batch 128 per GPU)\n")
    print(throughput_table(out, [("h14_ddp", "DDP", 2), ("h14_fsdp", "FSDP (full shard)", 2)], "h14_ddp"))


if __name__ == "__main__":
    main(sys.argv[1:])
