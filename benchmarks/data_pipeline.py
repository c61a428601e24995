"""Data-pipeline benchmark at 224 px (GPU; runs tiny on the CPU as a smoke test): is the B/16 step fed?

    python benchmarks/data_pipeline.py --root .gpu_data/imagenette224 [--make-from .gpu_data/imagenette.zip]
        [--workers 8,15] [--decode cpu,device] [--pin on] [--batch-size 128] [--steps 40] [--warmup 10]
        [--loader-batches 40] [--model configs/ijepa/vit_b16_in1k.yaml | tiny] [--set key=value ...] [--out FILE.json]

``--make-from SRC`` first builds ``--root`` from SRC (an ImageNet-style folder, or a .zip of one, extracted beside
``--root``) with ``data.reencode`` (224 px, quality 90, train split; resumable, so a second run reuses it).

For every (decode, workers, pin) setting, with the ``masked_images`` pipeline of the model's config:
(a) loader only: batches of ``data.root/train`` through the DataLoader, the copy to the device and the pipeline's
    device transform (``DeviceNormalize``, or ``DeviceJpegDecode`` for ``decode=device``), synchronised: img/s;
(b) the training step: ``Trainer._train_step`` (the real step: forward, backward, AdamW, EMA) fed by the real loader
    through ``Trainer._batches`` for ``--steps`` steps after ``--warmup``: ms/step, img/s, data wait (time blocked
    on the next batch, device transform included, as ``train/data_wait_frac``, over the steps' wall time), peak GPU
    memory. Once, the same step on cached device batches (no loading at all) gives the step's own time; "lost" is
    the share of the fed step's time above it, which counts what a host-side wait hides (GPU run-ahead) or misses.
Prints markdown tables; ``--out`` writes every number as JSON. ``--model tiny`` is a small ViT at 32 px (CPU).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.loaders import build_pretrain_loader, pipeline_device_transform  # noqa: E402
from data.reencode import reencode_folder  # noqa: E402
from jepa.config import load_config  # noqa: E402
from jepa.methods import get_method  # noqa: E402
from jepa.trainer import Trainer, make_accelerator  # noqa: E402

B16 = "configs/ijepa/vit_b16_in1k.yaml"
TINY = ["model.encoder=vit_tiny", "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.patch_size=8",
        "data.img_size=32", "predictor.depth=1", "predictor.dim=32", "predictor.num_heads=2", "masks.min_keep=2"]
TARGET_WAIT = 0.05  # issue 12: data wait < 5% of the step
CACHED_BATCHES = 8


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ the data
def source_folder(make_from: Path, root: Path) -> Path:
    """The ImageNet-style folder of ``make_from``: itself, or a .zip's content extracted beside ``root`` (once)."""
    if make_from.is_dir():
        return make_from
    if not zipfile.is_zipfile(make_from):
        raise SystemExit(f"--make-from '{make_from}' is neither a folder nor a .zip file")
    target = root.parent / f"{root.name}-source"
    done = target / ".extracted"
    if not done.exists():
        start = time.perf_counter()
        with zipfile.ZipFile(make_from) as archive:
            archive.extractall(target)
        done.touch()
        print(f"extracted {make_from} -> {target} in {time.perf_counter() - start:.1f} s", flush=True)
    candidates = [target] + sorted(p for p in target.iterdir() if p.is_dir())
    for folder in candidates:  # the zip may hold train/ at its top or inside one folder
        if (folder / "train").is_dir():
            return folder
    raise SystemExit(f"--make-from '{make_from}' holds no train/ folder (at its top or one folder down)")


def prepare(args) -> dict:
    """Build ``--root`` if asked; -> facts about it (images, mean file size, re-encoding time)."""
    facts = {}
    if args.make_from is not None:
        src = source_folder(args.make_from, args.root)
        report = reencode_folder(src, args.root, size=args.size, quality=90, workers=os.cpu_count() or 1,
                                 splits=("train",))
        print(report.summary(src, args.root), flush=True)
        facts["reencode"] = {"written": report.written, "existing": report.existing,
                             "unreadable": len(report.unreadable), "seconds": round(report.seconds, 2)}
    files = [p for p in (args.root / "train").glob("*/*") if p.is_file()]
    if not files:
        raise SystemExit(f"--root '{args.root}' has no train/<class>/<image> files (pass --make-from SRC to build it)")
    facts.update(images=len(files), mean_file_kib=round(sum(p.stat().st_size for p in files) / len(files) / 1024, 1))
    return facts


def config(args, decode: str, workers: int, pin: bool, output_dir: Path):
    model = TINY if args.model == "tiny" else []
    path = Path(B16 if args.model == "tiny" else args.model)
    path = path if path.is_file() else ROOT / path
    return load_config(path, [*model, f"data.root={args.root}", f"data.batch_size={args.batch_size}",
                              f"data.num_workers={workers}", f"data.decode={decode}", f"data.pin_memory={pin}",
                              f"trainer.output_dir={output_dir}", "trainer.progress_bar=false", *args.set])


def endless(loader, batch_sampler):
    """The loader's batches, epoch after epoch (as ``Trainer._batches`` walks them)."""
    for epoch in itertools.count():
        batch_sampler.set_position(epoch, 0)
        yield from loader


def release() -> None:
    """Collect what the last setting left (its loader, whose persistent workers exit with it, model, optimizer)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ (a) loader only
def loader_rate(cfg, parts, device: torch.device, batches: int, warmup: int) -> float:
    """img/s of loader + copy to the device + device transform, synchronised."""
    spec = get_method(cfg.method)
    loader, batch_sampler = build_pretrain_loader(spec.pipeline, cfg, parts, pin_memory=device.type == "cuda")
    transform = pipeline_device_transform(spec.pipeline, cfg)
    stream = endless(loader, batch_sampler)
    for _ in range(warmup):
        transform(next(stream).to(device, non_blocking=True))
    sync()
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(transform(next(stream).to(device, non_blocking=True)))
    sync()
    stream.close()
    return images / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ (b) the step
def timed_steps(trainer, batches, steps: int) -> tuple[float, int, float]:
    """(wall seconds, samples, seconds blocked on the next batch) of ``steps`` synchronised steps."""
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.data_wait = 0.0
    start, samples = time.perf_counter(), 0
    for _ in range(steps):
        samples += trainer._train_step(batches, {})
    sync()
    return time.perf_counter() - start, samples, trainer.data_wait


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def train_rate(cfg, steps: int, warmup: int, cached_run: bool) -> tuple[dict, dict | None]:
    """The step fed by the real loader -> (its numbers, and with ``cached_run`` those of the same step on cached
    device batches)."""
    accelerator = make_accelerator(cfg)
    spec = get_method(cfg.method)
    parts = spec.build(cfg)
    loader, batch_sampler = build_pretrain_loader(spec.pipeline, cfg, parts,
                                                  pin_memory=accelerator.device.type == "cuda")
    trainer = Trainer(cfg, parts, loader, batch_sampler, accelerator=accelerator,
                      device_transform=pipeline_device_transform(spec.pipeline, cfg))
    trainer.model.train()
    batches = trainer._batches()
    for _ in range(warmup):
        trainer._train_step(batches, {})
    wall, samples, waited = timed_steps(trainer, batches, steps)
    fed = {"ms_per_step": 1e3 * wall / steps, "img_s": samples / wall, "data_wait": waited / wall,
           "peak_gib": peak_gib()}
    cached = None
    if cached_run:
        stream = itertools.cycle([next(batches) for _ in range(CACHED_BATCHES)])
        for _ in range(max(1, warmup // 2)):
            trainer._train_step(stream, {})
        wall, samples, _ = timed_steps(trainer, stream, steps)
        cached = {"ms_per_step": 1e3 * wall / steps, "img_s": samples / wall, "peak_gib": peak_gib()}
    batches.close()
    accelerator.free_memory()
    return fed, cached


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a 224 px ImageNet-style folder (train/ is read)")
    parser.add_argument("--make-from", type=Path, default=None, help="build --root first from this folder or .zip")
    parser.add_argument("--size", type=int, default=224, help="image side --make-from writes")
    parser.add_argument("--workers", default="8,15", help="DataLoader worker counts (comma list)")
    parser.add_argument("--decode", default="cpu,device", help="data.decode values (comma list)")
    parser.add_argument("--pin", default="on", help="pinned memory: on, off or on,off")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--loader-batches", type=int, default=40, help="batches timed in the loader-only runs")
    parser.add_argument("--model", default=B16, help=f"a config YAML (default {B16}) or 'tiny' (small ViT, 32 px)")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides, key=value")
    parser.add_argument("--skip-loader", action="store_true", help="leave out (a), the loader-only runs")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for every number")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    args.decode = args.decode.split(",")
    pins = {"on": True, "off": False}
    if set(args.pin.split(",")) - set(pins):
        parser.error(f"--pin '{args.pin}' must be on, off or on,off")
    args.pin = [pins[p] for p in args.pin.split(",")]
    return args


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"\n{title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA GPU: a CPU smoke run of the harness (device decoding runs on the CPU); its numbers mean "
              "nothing", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    facts = prepare(args)
    device = torch.device("cuda" if cuda else "cpu")
    import torchvision

    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "torchvision": torchvision.__version__, "cpu_count": os.cpu_count(), "root": str(args.root),
              "model": args.model, "overrides": args.set, "batch_size": args.batch_size, "steps": args.steps,
              "warmup": args.warmup, **facts, "loader": [], "train": [], "cached_step": None}
    print(f"device: {result['device']}  torch {torch.__version__}  torchvision {torchvision.__version__}  "
          f"{os.cpu_count()} cores  {facts['images']} images of {facts['mean_file_kib']} KiB  batch {args.batch_size}",
          flush=True)
    settings = list(itertools.product(args.decode, args.workers, args.pin))
    workdir = Path(tempfile.mkdtemp(prefix="data_pipeline_"))
    if not args.skip_loader:
        cfg = config(args, "cpu", 0, True, workdir / "loader")
        parts = get_method(cfg.method).build(cfg)  # the loader reads its token grid only
        for decode, workers, pin in settings:
            cfg = config(args, decode, workers, pin, workdir / "loader")
            rate = loader_rate(cfg, parts, device, args.loader_batches, max(2, args.warmup // 2))
            result["loader"].append({"decode": decode, "workers": workers, "pin": pin, "img_s": rate})
            print(f"loader  decode={decode:6s} workers={workers:2d} pin={pin!s:5s}: {rate:,.0f} img/s", flush=True)
            release()
        del parts
    for i, (decode, workers, pin) in enumerate(settings):
        cfg = config(args, decode, workers, pin, workdir / f"train_{i}")
        fed, cached = train_rate(cfg, args.steps, args.warmup, cached_run=i == 0)
        release()
        result["train"].append({"decode": decode, "workers": workers, "pin": pin, **fed})
        if cached is not None:
            result["cached_step"] = cached
        print(f"step    decode={decode:6s} workers={workers:2d} pin={pin!s:5s}: {fed['ms_per_step']:.1f} ms  "
              f"{fed['img_s']:,.0f} img/s  data wait {100 * fed['data_wait']:.1f}%  peak {fed['peak_gib']:.1f} GiB",
              flush=True)
    base = result["cached_step"]["ms_per_step"]
    if result["loader"]:
        print(table("Loader only (DataLoader + copy + device transform)", ["decode", "workers", "pinned", "img/s"],
                    [[r["decode"], r["workers"], r["pin"], f"{r['img_s']:,.0f}"] for r in result["loader"]]))
    rows = [[r["decode"], r["workers"], r["pin"], f"{r['ms_per_step']:.1f}", f"{r['img_s']:,.0f}",
             f"{100 * r['data_wait']:.1f}%" + (" ok" if r["data_wait"] < TARGET_WAIT else ""),
             f"{100 * max(0.0, 1 - base / r['ms_per_step']):.1f}%", f"{r['peak_gib']:.1f}"] for r in result["train"]]
    rows.append(["cached batches", "-", "-", f"{base:.1f}", f"{result['cached_step']['img_s']:,.0f}", "-", "-",
                 f"{result['cached_step']['peak_gib']:.1f}"])
    print(table(f"Training step fed by the loader ({args.model}, batch {args.batch_size}, {args.steps} steps after "
                f"{args.warmup}; target data wait < {100 * TARGET_WAIT:.0f}%)",
                ["decode", "workers", "pinned", "ms/step", "img/s", "data wait", "lost vs cached", "peak GiB"], rows),
          flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
