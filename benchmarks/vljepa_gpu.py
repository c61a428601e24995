"""VL-JEPA benchmark: every predictor variant trained on easy-VQA and on Flickr8k-1k, then evaluated (easy-VQA test
accuracy, Flickr test R@1/5/10 both ways, Imagenette val zero-shot top-1), with training time, memory and size.

    python benchmarks/vljepa_gpu.py --x-encoder runs/x_vit_t16 --flickr ../shared/data/flickr8k-1k \
        --imagenette ../shared/data/imagenette --out outputs/vl_bench [--steps-vqa 1500 --steps-flickr 600] \
        [--variants transformer,mamba3] [key=value ...]   # overrides for every training run

Variants: the transformer, Mamba-3 and hybrid predictors (6 layers, 384-d), the transformer initialised from
MiniLM's layers (post-norm, as MiniLM), the no-predictor baseline (mean X token -> linear map, no query) and the
transformer on a random-init X-encoder of the same architecture. Prints a table and writes ``<out>/summary.json``;
``benchmarks/vljepa_gpu.sh`` runs it on the GPU machine (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from eval.cli import main as eval_main  # noqa: E402
VARIANTS = {
    "transformer": ["predictor.backbone=transformer"],
    "mamba3": ["predictor.backbone=mamba3"],
    "hybrid": ["predictor.backbone=hybrid", "predictor.pattern=MMMA"],
    "minilm_init": ["predictor.backbone=transformer", "predictor.init=minilm", "predictor.norm=post",
                    "predictor.norm_eps=1e-12"],
    "linear_baseline": ["vl.head=linear"],
    "random_x": ["predictor.backbone=transformer", "vl.x_encoder=random:{x_arch}"],
}
DATASETS = {"vqa": "configs/vljepa/easyvqa_minilm.yaml", "flickr": "configs/vljepa/flickr1k_minilm.yaml"}


def run(entry, argv: list[str], log: Path) -> float:
    """``entry(argv)`` (train.main or the eval CLI's main) in this process, its output in ``log`` (one process for
    every run: no interpreter, import and CUDA start per run); returns the wall seconds."""
    import contextlib
    import gc
    import logging
    import traceback

    import torch

    start = time.perf_counter()
    with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        handler = logging.StreamHandler(fh)
        logging.getLogger().addHandler(handler)
        try:
            entry(argv)
        except BaseException:
            traceback.print_exc(file=fh)
            fh.flush()
            print(log.read_text()[-4000:], flush=True)
            raise SystemExit(f"failed: {' '.join(argv)}")
        finally:
            logging.getLogger().removeHandler(handler)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return time.perf_counter() - start


def train_stats(log: Path) -> dict:
    text = log.read_text()
    rates = [float(x) for x in re.findall(r"samples/s (\d+)", text)]
    peaks = [float(x) for x in re.findall(r"peak ([0-9.]+) GiB", text)]
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", text)]
    params = re.findall(r"trainable parameters: ([0-9,]+)", text)
    return {"samples_per_s": sum(rates[1:]) / max(len(rates) - 1, 1) if rates else None,
            "peak_gib": max(peaks) if peaks else None, "final_loss": losses[-1] if losses else None,
            "trainable_params": int(params[-1].replace(",", "")) if params else None}


def records(path: Path, encoder: str) -> dict[tuple[str, str], float]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["encoder"] == encoder:
                out[(rec["task"], rec["metric"])] = rec["value"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--x-encoder", required=True)
    parser.add_argument("--x-arch", default="vit_tiny", help="the X-encoder's architecture (random_x variant)")
    parser.add_argument("--flickr", required=True)
    parser.add_argument("--imagenette", required=True)
    parser.add_argument("--out", default="outputs/vl_bench")
    parser.add_argument("--runs", default="runs/vl_bench")
    parser.add_argument("--steps-vqa", type=int, default=1500)
    parser.add_argument("--steps-flickr", type=int, default=600)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--vqa-limit", type=int, default=0, help="evaluate the first N easy-VQA test questions (0: all)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="vqa, flickr or both")
    parser.add_argument("--caption", default="", help="variants whose Flickr model is also evaluated by vl-caption "
                        "(caption bank and a trained Y-decoder: BLEU-4, CIDEr-D), comma-separated")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    logs = runs / "logs"  # the device tool returns at most 8 files: logs stay beside the runs
    logs.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    summary, started = {}, time.perf_counter()
    for variant in args.variants.split(","):
        extra = [o.format(x_arch=args.x_arch) for o in VARIANTS[variant]]
        row = {"variant": variant}
        for dataset in args.datasets.split(","):
            config = DATASETS[dataset]
            run_dir = runs / f"{dataset}_{variant}"
            steps = args.steps_vqa if dataset == "vqa" else args.steps_flickr
            data = [] if dataset == "vqa" else [f"data.root={args.flickr}"]
            cmd = ["--config", config, f"vl.x_encoder={args.x_encoder}",
                   f"trainer.output_dir={run_dir}", f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}",
                   "trainer.progress_bar=false", *data, *args.overrides, *extra]
            log = logs / f"train_{dataset}_{variant}.log"
            row[f"{dataset}_train_s"] = round(run(train.main, cmd, log), 1)
            row.update({f"{dataset}_{k}": v for k, v in train_stats(log).items()})
            evals = ([["vqa", f"vqa.limit={args.vqa_limit}"]] if dataset == "vqa" else
                     [["vl-retrieval", "--data", args.flickr], ["vl-classify", "--data", args.imagenette]])
            if dataset == "flickr" and variant in args.caption.split(","):
                evals.append(["vl-caption", "--data", args.flickr])
            for task, *rest in evals:
                try:
                    run(eval_main, [task, "--encoder", str(run_dir), "--out", str(out), *rest],
                        logs / f"eval_{task}_{dataset}_{variant}.log")
                except SystemExit as err:  # one failed evaluation is reported; the other runs go on
                    print(f"{variant} {dataset} {task}: {err}", flush=True)
                    row[f"{task}:failed"] = str(err)
            for (task, metric), value in records(results_file, str(run_dir)).items():
                row[f"{task}:{metric}"] = value
        row["wall_s"] = round(time.perf_counter() - started, 1)
        summary[variant] = row
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(row), flush=True)
    print_table(summary)


def print_table(summary: dict) -> None:
    cols = [("vqa:accuracy", "VQA acc", 100), ("vl_retrieval:image_to_text_R@1", "i2t R@1", 100),
            ("vl_retrieval:image_to_text_R@5", "i2t R@5", 100), ("vl_retrieval:image_to_text_R@10", "i2t R@10", 100),
            ("vl_retrieval:text_to_image_R@1", "t2i R@1", 100), ("vl_retrieval:text_to_image_R@5", "t2i R@5", 100),
            ("vl_retrieval:text_to_image_R@10", "t2i R@10", 100), ("vl_classify:zero_shot_top1", "0-shot", 100),
            ("vqa_trainable_params", "params (M)", 1e-6), ("vqa_train_s", "VQA train s", 1),
            ("flickr_train_s", "Flickr train s", 1), ("vqa_peak_gib", "peak GiB", 1)]
    header = "| variant | " + " | ".join(name for _, name, _ in cols) + " |"
    print(header)
    print("|" + "---|" * (len(cols) + 1))
    for variant, row in summary.items():
        cells = []
        for key, _, scale in cols:
            value = row.get(key)
            cells.append("-" if value is None else f"{value * scale:.1f}" if scale != 1 else f"{value:g}")
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
