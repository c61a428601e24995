"""``jepa eval {linear,attentive,knn,lowshot} --encoder X --data PATH [--out DIR] [--config YAML] [key=value ...]``

``--encoder``: a training output/checkpoint folder (``--which target|context``), a ``jepa export`` folder, or
``timm:<model name>`` (random init). ``--data``: an ImageNet-style folder (train/<class>/*, val/<class>/*).
Config: ``configs/eval/<task>.yaml`` (or ``--config``) then ``key=value`` overrides (keys of ``eval.config``).
Runs under ``accelerate launch`` (feature extraction is sharded over the processes; probes run on the main one).
Prints a table, appends JSON records to ``<out>/results.jsonl``; lowshot writes ``lowshot.png``, linear
``confusion_linear.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TASKS, EvalConfig, load_eval_config
from .encoders import FrozenEncoder, load_frozen_encoder
from .features import FeatureSet, build_dataset, extract_features
from .results import Record, append_records, confusion_matrix, format_table, plot_confusion, plot_lowshot


@dataclass
class EvalRun:
    task: str
    cfg: EvalConfig
    encoder: FrozenEncoder
    data: str
    out: Path
    accelerator: object
    which: str

    @property
    def img_size(self) -> int:
        return self.cfg.features.img_size or self.encoder.img_size

    def features(self, split: str, mode: str = "pooled", indices: list[int] | None = None) -> FeatureSet:
        f = self.cfg.features
        dataset = build_dataset(self.data, split, self.img_size, indices)
        result = extract_features(self.encoder, dataset, mode, self.accelerator, layers=f.layers,
                                  batch_size=f.batch_size, num_workers=f.num_workers, precision=f.precision,
                                  cache_dir=f.cache_dir, progress=f.progress_bar)
        self.say(f"{split}: {len(result.labels)} images, features {tuple(result.features.shape)} "
                 f"({'cache hit' if result.cached else 'extracted'}, key {result.key[:12]})")
        return result

    def say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def record(self, metric: str, value: float, seed: int | None = None, **extra) -> Record:
        config = {"which": self.which, "img_size": self.img_size, "features": dataclasses.asdict(self.cfg.features),
                  self.task: dataclasses.asdict(getattr(self.cfg, self.task)), **extra}
        return Record(self.task, str(self.data), self.encoder.name, metric, float(value),
                      self.cfg.seed if seed is None else seed, config)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def run_knn(run: EvalRun) -> list[Record]:
    from .knn import knn_accuracy

    train, val = run.features("train"), run.features("val")
    if not run.accelerator.is_main_process:
        return []
    c = run.cfg.knn
    device = run.accelerator.device
    acc = knn_accuracy(train.features.to(device), train.labels.to(device), val.features.to(device),
                       val.labels.to(device), len(train.classes), c.ks, c.temperature)
    run.say(format_table([(str(k), _pct(v["top1"]), _pct(v["top5"])) for k, v in acc.items()],
                         ("k", "top-1 %", "top-5 %")))
    records = []
    for k, v in acc.items():
        records += [run.record(f"top1@k={k}", v["top1"]), run.record(f"top5@k={k}", v["top5"])]
    return records


def _grid_records(run: EvalRun, result) -> list[Record]:
    sel, best = result.selected_head, result.best_head
    run.say(format_table(
        [(f"{h['lr']:g}", f"{h['weight_decay']:g}", _pct(h["holdout_top1"]), _pct(h["val_top1"]), _pct(h["val_top5"]),
          ("selected" if i == result.selected else "") + (" best-of-grid" if i == result.best_of_grid else ""))
         for i, h in enumerate(result.heads)],
        ("lr", "wd", "held-out top-1 %", "val top-1 %", "val top-5 %", "")))
    run.say(format_table([("top-1 (selected on held-out train)", _pct(sel["val_top1"]), f"lr={sel['lr']:g} wd={sel['weight_decay']:g}"),
                          ("top-5 (selected on held-out train)", _pct(sel["val_top5"]), ""),
                          ("top-1 best-of-grid (chosen on val: optimistic)", _pct(best["val_top1"]),
                           f"lr={best['lr']:g} wd={best['weight_decay']:g}")],
                         (f"{run.task} probe", "val %", "head")))
    head = lambda h: {"lr": h["lr"], "weight_decay": h["weight_decay"]}  # noqa: E731
    return [run.record("top1_selected", sel["val_top1"], head=head(sel)),
            run.record("top5_selected", sel["val_top5"], head=head(sel)),
            run.record("top1_best_of_grid", best["val_top1"], head=head(best)),
            run.record("top5_best_of_grid", best["val_top5"], head=head(best))]


def run_linear(run: EvalRun) -> list[Record]:
    from .linear import linear_probe

    train, val = run.features("train"), run.features("val")
    if not run.accelerator.is_main_process:
        return []
    result = linear_probe(train.features, train.labels, val.features, val.labels, len(train.classes),
                          run.cfg.linear, run.cfg.seed, run.accelerator.device)
    records = _grid_records(run, result)
    matrix = confusion_matrix(val.labels, result.val_predictions, len(train.classes))
    path = plot_confusion(matrix, train.classes, run.out / "confusion_linear.png",
                          f"linear probe, {run.encoder.name}\nval top-1 {_pct(result.selected_head['val_top1'])}%")
    run.say(f"confusion matrix: {path}")
    return records


def run_attentive(run: EvalRun) -> list[Record]:
    from .attentive import attentive_probe

    train, val = run.features("train", "tokens"), run.features("val", "tokens")
    if not run.accelerator.is_main_process:
        return []
    result = attentive_probe(train.features, train.labels, val.features, val.labels, len(train.classes),
                             run.cfg.attentive, run.cfg.seed, run.accelerator.device)
    return _grid_records(run, result)


def run_lowshot(run: EvalRun) -> list[Record]:
    from .lowshot import k_shot_sweep, probe_subset, summarise_runs
    from .splits import parse_split_file

    c = run.cfg.lowshot
    indices = parse_split_file(c.split_file, run.data, "train") if c.split_file else None
    train, val = run.features("train", indices=indices), run.features("val")
    if not run.accelerator.is_main_process:
        return []
    num_classes = len(train.classes)
    if c.split_file:
        result = probe_subset(train.features, train.labels, torch.arange(len(train.labels)), val.features,
                              val.labels, num_classes, c.lambdas, c.folds, c.default_lambda, run.cfg.seed, c.max_iter)
        run.say(format_table([(Path(c.split_file).name, str(result.num_labelled), _pct(result.top1),
                               _pct(result.top5), f"{result.lam:g}", result.lam_selection)],
                             ("split file", "labelled", "top-1 %", "top-5 %", "lambda", "lambda chosen by")))
        extra = dict(split_file=str(c.split_file), num_labelled=result.num_labelled, lam=result.lam,
                     lam_selection=result.lam_selection)
        return [run.record("top1_split_file", result.top1, **extra), run.record("top5_split_file", result.top5, **extra)]
    runs = k_shot_sweep(train.features, train.labels, val.features, val.labels, num_classes, c.shots, c.seeds,
                        c.lambdas, c.folds, c.default_lambda, c.max_iter)
    summary = summarise_runs(runs)
    run.say(format_table([(str(k), f"{100 * m:.2f} ± {100 * s:.2f}", str(n),
                           " ".join(f"{r.lam:g}" for r in runs if r.shots == k)) for k, (m, s, n) in summary.items()],
                         ("shots/class", "val top-1 % (mean ± std)", "seeds", "lambda per seed")))
    records = [run.record(f"top1@{r.shots}shot", r.top1, seed=r.seed, lam=r.lam, lam_selection=r.lam_selection)
               for r in runs]
    for k, (mean, std, n) in summary.items():
        records += [run.record(f"top1@{k}shot_mean", mean, seeds=c.seeds),
                    run.record(f"top1@{k}shot_std", std, seeds=c.seeds)]
    path = plot_lowshot(summary, run.out / "lowshot.png",
                        f"low-shot logistic regression\n{run.encoder.name} (mean ± std over {len(c.seeds)} seeds)")
    run.say(f"plot: {path}")
    return records


RUNNERS = {"knn": run_knn, "linear": run_linear, "attentive": run_attentive, "lowshot": run_lowshot}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jepa eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--encoder", required=True, help="checkpoint folder, export folder, or timm:<model name>")
    parser.add_argument("--which", default="target", choices=["target", "context"],
                        help="which encoder of a training checkpoint (default: target, the EMA one)")
    parser.add_argument("--data", required=True, help="ImageNet-style folder with train/ and val/")
    parser.add_argument("--out", default="outputs/eval", help="folder for results.jsonl and plots")
    parser.add_argument("--config", default=None, help="YAML (default: configs/eval/<task>.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. linear.epochs=20 features.img_size=128")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str]) -> list[Record]:
    """Run one evaluation; returns the records written (empty on non-main processes)."""
    from accelerate import Accelerator

    args = parse_args(argv)
    cfg = load_eval_config(args.task, args.config, args.overrides)
    logging.basicConfig(level=logging.WARNING)
    accelerator = Accelerator()
    encoder = load_frozen_encoder(args.encoder, args.which, cfg.features.timm_seed, cfg.features.img_size)
    out = Path(args.out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    run = EvalRun(args.task, cfg, encoder, args.data, out, accelerator, args.which)
    torch.manual_seed(cfg.seed)
    run.say(f"jepa eval {args.task}: encoder {args.encoder} ({encoder.kind}"
            f"{', ' + args.which if encoder.kind == 'checkpoint' else ''}, weights {encoder.fingerprint[:12]}), "
            f"data {args.data}, {run.img_size}px, {accelerator.num_processes} process(es) on {accelerator.device}")
    records = RUNNERS[args.task](run)
    if accelerator.is_main_process and records:
        path = append_records(out, records)
        run.say(f"{len(records)} records appended to {path}")
    return records
