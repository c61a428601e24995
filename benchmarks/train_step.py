"""I-JEPA training-step benchmark (GPU): our full step against the official I-JEPA step, in one run.

    python benchmarks/train_step.py [--official .cache/official/ijepa] [--models b16,h14] [--modes truncate,pad]
        [--variants plain,...] [--batch 128] [--steps 20] [--warmup 6] [--profile b16] [--out DIR]

"ours" is ``Trainer._train_step`` (target forward, context encoder + predictor, loss, backward, clip, fused AdamW,
``_foreach`` EMA, schedules) driven with pre-sampled masks on random images, as in training. "official" is the step of
facebookresearch/ijepa's ``src/train.py`` re-created around its own modules (its ViT, predictor, ``apply_masks``,
``repeat_interleave_batch``, ``grad_logger``, GradScaler + bf16 autocast, per-parameter EMA loop, ``float(loss)``),
imported at run time from ``--official`` (a checkout's root holding ``src/``; never part of this repository). Both
draw masks with the paper's settings (4 targets of scale 0.15-0.2, context 0.85-1.0, min_keep 10).

Variants of ours (each a set of config overrides or batch edits, measured on its own):
    plain      the default step
    masked     every attention call given its key-padding mask even when nothing is padded (the old behaviour)
    compile    regional torch.compile of the blocks (``trainer.compile=true``)
    ckpt       activation checkpointing of the encoder and predictor blocks (memory for compute)
    compile_ckpt  both
    compile_half_ckpt  compile, and checkpointing of the first half of the encoder and predictor blocks
Prints one table row per (model, mode, variant): ms/step, img/s, peak GiB, context / target tokens, TFLOP/s and MFU
(FLOPs counted by ``torch.utils.flop_counter`` over one step), and the ratio to the official step of the same model.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.batch import Batch  # noqa: E402
from data.loaders import mask_sampler_from_config  # noqa: E402
from jepa.config import load_config  # noqa: E402
from jepa.methods import build_method  # noqa: E402
from jepa.trainer import Trainer, make_accelerator  # noqa: E402

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H200 (SXM)

# model key -> (our config, official encoder name, patch, predictor depth, heads of the predictor)
MODELS = {
    "b16": ("configs/ijepa/vit_b16_in1k.yaml", "vit_base", 16, 6, 12),
    "h14": ("configs/ijepa/vit_h14_in1k.yaml", "vit_huge", 14, 12, 16),
}
CHECKPOINTING = ["model.checkpoint_blocks=1000", "predictor.checkpoint_blocks=1000"]
HALF_CHECKPOINTING = {"b16": ["model.checkpoint_blocks=6", "predictor.checkpoint_blocks=3"],
                      "h14": ["model.checkpoint_blocks=18", "predictor.checkpoint_blocks=6"]}
VARIANTS = {"plain": [], "masked": [], "compile": ["trainer.compile=true"], "ckpt": CHECKPOINTING,
            "compile_ckpt": ["trainer.compile=true", *CHECKPOINTING], "compile_half_ckpt": ["trainer.compile=true"]}
MASK_ARGS = dict(target_scale=(0.15, 0.2), context_scale=(0.85, 1.0), aspect=(0.75, 1.5), num_targets=4, min_keep=10)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, warmup: int, steps: int) -> tuple[float, float]:
    """-> (median ms of ``steps`` synchronised steps after ``warmup``, peak GiB)."""
    for _ in range(warmup):
        step()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return statistics.median(times), peak


def step_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def profile_table(step, label: str, out: Path | None) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    sync()
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(5):
            step()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
    if out is not None:
        (out / f"profile_{label}.txt").write_text(table)
    return table


# ---------------------------------------------------------------------------------------------------- ours
def our_step(model: str, mode: str, variant: str, batch_size: int, accelerator, workdir: Path):
    cfg_path, _, _, depth, heads = MODELS[model]
    overrides = [f"masks.equalize={mode}", f"data.batch_size={batch_size}", "data.img_size=224",
                 f"predictor.depth={depth}", f"predictor.num_heads={heads}", "masks.min_keep=10",
                 f"trainer.output_dir={workdir / f'{model}_{mode}_{variant}'}", "trainer.progress_bar=false",
                 *VARIANTS[variant], *(HALF_CHECKPOINTING[model] if variant == "compile_half_ckpt" else [])]
    cfg = load_config(ROOT / cfg_path, overrides)
    parts = build_method(cfg)
    trainer = Trainer(cfg, parts, loader=None, batch_sampler=None, accelerator=accelerator)
    sampler = mask_sampler_from_config(cfg, parts.token_grid)
    device = trainer.device
    batches = []
    for i in range(8):
        masks = sampler(batch_size, (0, 0, i))
        if variant == "masked":
            masks = dataclasses.replace(masks, context_padded=True, target_padded=True)
        batches.append(Batch(pixels=torch.randn(batch_size, 3, 224, 224), masks=[masks]).to(device))
    tokens = (statistics.mean(float(b.masks[0].context_lengths.float().mean()) for b in batches),
              float(batches[0].masks[0].target_idx.shape[-1]))
    stream = itertools.cycle(batches)
    trainer.model.train()

    def step():
        trainer._train_step(stream, {})

    return step, tokens, trainer


# ---------------------------------------------------------------------------------------------------- official
def official_step(model: str, batch_size: int, official: Path):
    """The official I-JEPA train_step (src/train.py) on its own modules, masks pre-sampled by its collator."""
    if str(official) not in sys.path:
        sys.path.insert(0, str(official))
    import src.models.vision_transformer as vit
    from src.masks.multiblock import MaskCollator
    from src.masks.utils import apply_masks
    from src.utils.logging import grad_logger
    from src.utils.tensors import repeat_interleave_batch

    _, name, patch, depth, _ = MODELS[model]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = vit.__dict__[name](img_size=[224], patch_size=patch).to(device)
    predictor = vit.__dict__["vit_predictor"](num_patches=encoder.patch_embed.num_patches, embed_dim=encoder.embed_dim,
                                              predictor_embed_dim=384, depth=depth,
                                              num_heads=encoder.num_heads).to(device)
    target_encoder = copy.deepcopy(encoder)
    for p in target_encoder.parameters():
        p.requires_grad = False
    groups = [
        {"params": [p for n, p in m.named_parameters() if "bias" not in n and p.ndim != 1]} for m in (encoder, predictor)
    ] + [
        {"params": [p for n, p in m.named_parameters() if "bias" in n or p.ndim == 1], "WD_exclude": True,
         "weight_decay": 0} for m in (encoder, predictor)
    ]
    optimizer = torch.optim.AdamW(groups)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    collator = MaskCollator(input_size=(224, 224), patch_size=patch, pred_mask_scale=MASK_ARGS["target_scale"],
                            enc_mask_scale=MASK_ARGS["context_scale"], aspect_ratio=MASK_ARGS["aspect"], nenc=1,
                            npred=MASK_ARGS["num_targets"], allow_overlap=False, min_keep=MASK_ARGS["min_keep"])
    fake = [(torch.zeros(1), 0)] * batch_size
    sampled = []
    for _ in range(8):
        _, masks_enc, masks_pred = collator(fake)
        sampled.append(([m.to(device) for m in masks_enc], [m.to(device) for m in masks_pred]))
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    tokens = (statistics.mean(float(e[0].shape[1]) for e, _ in sampled), float(sampled[0][1][0].shape[1]))
    stream = itertools.cycle(sampled)
    momentum, lr, wd = 0.996, 1e-3, 0.04

    def step():
        masks_enc, masks_pred = next(stream)
        for group in optimizer.param_groups:  # what its WarmupCosineSchedule / CosineWDSchedule .step() do
            group["lr"] = lr
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                h = target_encoder(images)
                h = F.layer_norm(h, (h.size(-1),))
                h = apply_masks(h, masks_pred)
                h = repeat_interleave_batch(h, len(images), repeat=len(masks_enc))
            z = predictor(encoder(images, masks_enc), masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        grad_logger(encoder.named_parameters())
        optimizer.zero_grad()
        with torch.no_grad():
            for param_q, param_k in zip(encoder.parameters(), target_encoder.parameters()):
                param_k.data.mul_(momentum).add_((1.0 - momentum) * param_q.detach().data)
        return float(loss.detach())

    mask_ms = _time_cpu(lambda: collator(fake))
    return step, tokens, mask_ms, (encoder, predictor, target_encoder, optimizer)


def _time_cpu(fn, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, default=ROOT / ".cache/official/ijepa")
    parser.add_argument("--models", default="b16,h14")
    parser.add_argument("--modes", default="truncate,pad")
    parser.add_argument("--variants", default="plain,masked,compile")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--profile", default="b16", help="models whose plain truncate step and official step are "
                                                         "profiled (comma list; '' for none)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the profile tables")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: a CPU smoke run of the harness; its numbers mean nothing", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    profiled = set(filter(None, args.profile.split(",")))
    have_official = (args.official / "src" / "train.py").is_file()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {name}  torch {torch.__version__}  batch {args.batch}  "
          f"official: {args.official if have_official else 'not found (ours only)'}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="train_step_"))
    rows = []
    for model in args.models.split(","):
        base = None
        if have_official:
            step, tokens, mask_ms, keep = official_step(model, args.batch, args.official)
            flops = step_flops(step)
            ms, peak = timed(step, args.warmup, args.steps)
            base = ms
            rows.append((model, "official", "-", ms, args.batch * 1e3 / ms, peak, tokens, flops, 1.0))
            print(f"{model} official: {ms:.1f} ms  {args.batch * 1e3 / ms:.0f} img/s  {peak:.1f} GiB  "
                  f"masks {mask_ms:.1f} ms/batch", flush=True)
            if model in profiled:
                print(profile_table(step, f"{model}_official", args.out), flush=True)
            del step, keep
            torch.cuda.empty_cache()
        mode_flops = {}
        for mode in args.modes.split(","):
            for variant in args.variants.split(","):
                accelerator = make_accelerator(load_config(ROOT / MODELS[model][0]))
                step, tokens, trainer = our_step(model, mode, variant, args.batch, accelerator, workdir)
                # model FLOPs: compiled and checkpointed variants do plain's arithmetic (recomputation not counted).
                # Never count a compiled step: its first call under the counter's dispatch mode makes dynamo give up
                # on the blocks' code for the rest of the process (everything after would run eager).
                if "compile" not in variant and (variant in ("plain", "masked") or mode not in mode_flops):
                    mode_flops[mode] = step_flops(step)
                flops = mode_flops.get(mode, float("nan"))
                ms, peak = timed(step, args.warmup, args.steps)
                ratio = base / ms if base else float("nan")
                rows.append((model, mode, variant, ms, args.batch * 1e3 / ms, peak, tokens, flops, ratio))
                print(f"{model} {mode} {variant}: {ms:.1f} ms  {args.batch * 1e3 / ms:.0f} img/s  {peak:.1f} GiB  "
                      f"x{ratio:.2f} official", flush=True)
                if model in profiled and mode == "truncate" and variant == "plain":
                    print(profile_table(step, f"{model}_{mode}_{variant}", args.out), flush=True)
                sampler = mask_sampler_from_config(trainer.cfg, (224 // MODELS[model][2],) * 2)
                mask_ms = _time_cpu(lambda: sampler(args.batch, (0, 0, 0)))
                print(f"  our mask sampler: {mask_ms:.2f} ms/batch", flush=True)
                accelerator.free_memory()
                del step, trainer
                torch.cuda.empty_cache()
    print("\n| model | step | variant | ms/step | img/s | peak GiB | context / target tokens | TFLOP/s | MFU | "
          "x official |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, mode, variant, ms, ips, peak, (ctx, tgt), flops, ratio in rows:
        tflops = flops / (ms / 1e3) / 1e12
        print(f"| {model} | {mode} | {variant} | {ms:.1f} | {ips:,.0f} | {peak:.1f} | {ctx:.0f} / {tgt:.0f} | "
              f"{tflops:.0f} | {100 * tflops * 1e12 / H200_BF16_PEAK:.0f}% | {ratio:.2f} |")


if __name__ == "__main__":
    main()
