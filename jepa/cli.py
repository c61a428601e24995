"""The ``jepa`` console script.

    jepa train --config configs/quickstart.yaml key=value ...
    jepa eval {linear,attentive,knn,lowshot} --encoder X --data PATH [--out DIR] [key=value ...]
    jepa data make-motion --out DIR --per-class N   (the labelled camera-motion video set, data/motion.py)
    jepa data reencode --src DIR --out DIR [--size 224] [--quality 90] [--workers N]   (square JPEGs, data/reencode.py)
    jepa data easyvqa-classes --out DIR [--label shape|color]   (easy-VQA as a labelled image folder)
    jepa export --ckpt DIR --to timm|hf|safetensors|onnx|vjepa2 --out DIR [--overwrite] [--which NAME] [--img-size N]
    jepa stream --video PATH --ckpt DIR [--mode online|offline|uniform] [--fps 2] ...   (eval/stream_cli.py)

Each subcommand imports its implementation lazily, inside its function.
"""
from __future__ import annotations

import argparse
import sys

COMMANDS = ("train", "eval", "export", "data", "stream")
DATA_COMMANDS = ("make-motion", "reencode", "easyvqa-classes")


def run_train(argv: list[str]) -> None:
    import train  # the dispatcher may reach train.py's main, lazily

    train.main(argv)


def run_eval(argv: list[str]) -> None:
    from eval.cli import main as eval_main

    eval_main(argv)


def run_stream(argv: list[str]) -> None:
    from eval.stream_cli import main as stream_main

    stream_main(argv)


def run_data(argv: list[str]) -> None:
    if not argv or argv[0] not in DATA_COMMANDS:
        raise SystemExit(f"jepa data: expected one of {list(DATA_COMMANDS)}, got {argv[:1]}")
    if argv[0] == "reencode":
        from data.reencode import main as reencode

        reencode(argv[1:])
        return
    if argv[0] == "easyvqa-classes":
        from data.easyvqa_classes import main as easyvqa_classes

        easyvqa_classes(argv[1:])
        return
    from data.motion import main as make_motion

    make_motion(argv[1:])


def run_export(argv: list[str]) -> None:
    from jepa.export import FORMATS, export_encoder

    parser = argparse.ArgumentParser(prog="jepa export", description="Write a checkpoint's encoder only "
                                     "(prefixes stripped, config alongside) in timm / HF / safetensors / ONNX form.")
    parser.add_argument("--ckpt", required=True, help="training output folder (newest checkpoint) or checkpoint folder")
    parser.add_argument("--to", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder: new or empty (never a checkpoint or run "
                        "folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace the whole content of a non-empty --out")
    parser.add_argument("--which", default=None, help="which of the method's encoders (I-JEPA: target (EMA, the "
                        "default) or context)")
    parser.add_argument("--img-size", type=int, default=0, help="export resolution (default: training data.img_size)")
    args = parser.parse_args(argv)
    out = export_encoder(args.ckpt, args.to, args.out, args.which, args.img_size or None, args.overwrite)
    print(f"exported the {args.which or 'default'} encoder of {args.ckpt} as {args.to} to {out}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="jepa", description="openjepa: train, evaluate and export JEPA encoders")
    parser.add_argument("command", choices=COMMANDS,
                        help="train: pretrain (same arguments as train.py); eval: frozen evaluations; export: "
                             "encoder-only export; data: build datasets (make-motion, reencode, easyvqa-classes); stream: caption a video, "
                             "decoding only when its meaning changes")
    args, _ = parser.parse_known_args(argv[:1])
    {"train": run_train, "eval": run_eval, "export": run_export, "data": run_data,
     "stream": run_stream}[args.command](argv[1:])


if __name__ == "__main__":
    main()
