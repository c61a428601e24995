"""Run quickstart recipe variants side by side, each pinned to its own pair of CPU cores (the 2-core CPU the
quickstart targets), and print their kNN accuracy over training as one table.

    python benchmarks/quickstart_sweep.py --data ../shared/data/imagenette --out runs/sweep --cores 2-15 \
        --steps 300 --variant base= --variant lr4e-3="optim.lr=4e-3" [--config configs/quickstart.yaml]

(The I-JEPA variants in BENCHMARKS.md were run with ``--config configs/ijepa/quickstart_cpu.yaml``.)
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_cores(spec: str) -> list[int]:
    lo, hi = spec.split("-")
    return list(range(int(lo), int(hi) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cores", default="0-1", help="core range, split into pairs, one variant per pair")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the recipe the variants override")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--variant", action="append", default=[], help="name=override override ...")
    args = parser.parse_args()

    cores = parse_cores(args.cores)
    pairs = [cores[i:i + 2] for i in range(0, len(cores) - 1, 2)]
    variants = [v.split("=", 1) for v in args.variant]
    if len(variants) > len(pairs):
        sys.exit(f"{len(variants)} variants need {2 * len(variants)} cores, got {len(cores)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for (name, overrides), pair in zip(variants, pairs):
        cmd = ["taskset", "-c", ",".join(map(str, pair)), sys.executable, str(REPO / "train.py"), "--config",
               str(REPO / args.config), f"data.root={args.data}", f"trainer.output_dir={out / name}",
               f"trainer.max_steps={args.steps}", "trainer.progress_bar=false", *overrides.split()]
        env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
        log = open(out / f"{name}.log", "w")
        procs.append((name, overrides, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                      time.time()))
    rows = []
    for name, overrides, proc, start in procs:
        try:
            proc.wait(timeout=max(1, args.timeout - (time.time() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
        elapsed = time.time() - start
        text = (out / f"{name}.log").read_text()
        knn = re.findall(r"step (\d+): knn = ([0-9.]+)", text)
        speed = re.findall(r"samples/s (\d+)", text)
        rows.append((name, overrides, " ".join(f"{s}:{v}" for s, v in knn), speed[-1] if speed else "-",
                     f"{elapsed:.0f}", proc.returncode))
    print("| variant | overrides | kNN by step | img/s | wall s | rc |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
