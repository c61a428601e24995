"""``jepa eval <task> --encoder X --data PATH [--out DIR] [--config YAML] [key=value ...]``

Tasks are registered (``eval.tasks.register_task``): linear, attentive, knn, lowshot, and any other registered one.
``--encoder``: a training output/checkpoint folder (``--which``: one of its method's encoders, default the method's own), a ``jepa export`` folder, or
``timm:<model name>`` (random init). ``--data``: an ImageNet-style folder (train/<class>/*, val/<class>/*), or a clip
source: train/<class>/*.mp4 and val/<class>/*.mp4, or a folder with train and val manifests (train.csv / val.csv:
``<path> <label>`` lines or a CSV with a path column and label columns, as ``jepa data make-motion`` writes them;
``data.labelled.find_labelled_source`` decides). Clips: ``features.frames_per_clip`` / ``features.frame_step``
(0: the video encoder's training values), ``features.num_clips`` x ``features.num_crops`` views per video;
``features.label_columns=[motion,object]`` evaluates each named manifest column.
Config: ``configs/eval/<task>.yaml`` (or ``--config``) then ``key=value`` overrides (``seed``, ``features.*`` and
the task's own ``<task>.*`` keys).
Runs under ``accelerate launch`` (feature extraction is sharded over the processes; probes run on the main one).
Prints a table, appends JSON records to ``<out>/results.jsonl``; lowshot writes ``lowshot.png``, linear
``confusion_linear.png``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from data.labelled import find_labelled_source

from .encoders import load_frozen_encoder
from .results import Record, append_records
from .tasks import EvalRun, get_task, load_eval_config, task_names


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = task_names()
    tasks = "\n".join(f"  {name:<10} {get_task(name).summary}" for name in names)
    parser = argparse.ArgumentParser(prog="jepa eval", description=__doc__, epilog=f"tasks:\n{tasks}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=names + [n.replace("_", "-") for n in names if "_" in n])
    parser.add_argument("--encoder", required=True, help="checkpoint folder, export folder, or timm:<model name>; "
                        "VL tasks (vl-retrieval, vl-classify, vqa): a VL-JEPA training output/checkpoint folder")
    parser.add_argument("--which", default=None,
                        help="which of the method's encoders in a training checkpoint (default: the method's own: "
                             "target, the EMA one, for I-JEPA / V-JEPA; backbone for LeJEPA); others: context, ...")
    parser.add_argument("--data", default=None, help="ImageNet-style folder with train/ and val/, or a clip source: "
                        "train/ and val/ class folders of videos, or train.csv and val.csv manifests; VL tasks: the "
                        "caption folder (vl-retrieval; default: the model's training data.root), the image folder "
                        "(vl-classify), nothing (vqa: easy-VQA)")
    parser.add_argument("--out", default="outputs/eval", help="folder for results.jsonl and plots")
    parser.add_argument("--config", default=None, help="YAML (default: configs/eval/<task>.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. linear.epochs=20 features.img_size=128")
    args = parser.parse_intermixed_args(argv)
    args.task = args.task.replace("-", "_")
    return args


def main(argv: list[str]) -> list[Record]:
    """Run one evaluation; returns the records written (empty on non-main processes)."""
    from accelerate import Accelerator

    args = parse_args(argv)
    spec = get_task(args.task)
    cfg = load_eval_config(args.task, args.config, args.overrides)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    if spec.needs == "vl":
        run = _vl_run(args, cfg, out)
    else:
        if args.data is None:
            raise SystemExit(f"jepa eval {args.task}: --data is required (an image folder or a clip source)")
        for split in ("train", "val"):
            find_labelled_source(args.data, split)  # a --data value that holds no source fails before any work
        encoder = load_frozen_encoder(args.encoder, args.which, cfg.features.timm_seed, cfg.features.img_size)
        run = EvalRun(args.task, cfg, encoder, args.data, out, Accelerator(), encoder.which or "-")
        run.say(f"jepa eval {args.task}: encoder {args.encoder} ({encoder.kind}"
                f"{', ' + encoder.which if encoder.kind == 'checkpoint' else ''}, weights {encoder.fingerprint[:12]}), "
                f"data {args.data}, {run.img_size}px, {run.accelerator.num_processes} process(es) on "
                f"{run.accelerator.device}")
    if run.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    records = spec.runner(run)
    if run.accelerator.is_main_process and records:
        path = append_records(out, records)
        run.say(f"{len(records)} records appended to {path}")
    return records


def _vl_run(args, cfg, out: Path) -> EvalRun:
    """The run of a VL task: the VL-JEPA model of ``--encoder``; ``--data`` defaults to its training source."""
    from accelerate import Accelerator

    from .vl_embed import load_vl

    vl = load_vl(args.encoder)
    data = args.data
    if data is None:
        if args.task == "vl_classify":
            raise SystemExit("jepa eval vl-classify: --data is required (an image folder with val/<class>/*, e.g. "
                             "../shared/data/imagenette)")
        data = "easyvqa" if args.task == "vqa" else vl.cfg.data.root
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    run = EvalRun(args.task, cfg, None, data, out, accelerator, "vl", vl=vl)
    run.say(f"jepa eval {args.task}: VL-JEPA model {args.encoder} ({vl.ckpt.name}, X {vl.cfg.vl.x_encoder}, "
            f"Y {vl.cfg.vl.y_encoder}, predictor {vl.cfg.vl.head}/{vl.cfg.predictor.backbone}), data {data}, "
            f"{run.img_size}px, on {accelerator.device}")
    return run
