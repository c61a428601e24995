"""Batched frozen-feature extraction (bf16 on GPU, progress bar, multi-process under ``accelerate launch``),
through the on-disk cache.

Modes:
- ``pooled``: (N, k*D) float32 — each of the last k layers mean-pooled over tokens, concatenated (k=1: the
  mean-pooled last layer).
- ``tokens``: (N, T, D) float16 — every last-layer token (the attentive probe's input).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.folder import ImageFolderDataset
from data.labelled import collate_labelled
from data.transforms import eval_transform

from .cache import cache_key, data_fingerprint, load_entry, save_entry
from .encoders import FrozenEncoder

MODES = ("pooled", "tokens")


@dataclass
class FeatureSet:
    """features (N, F) float32 or (N, T, D) float16; labels (N,) long; ``cached``: read from the cache."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    samples: list[tuple[Path, int]]
    cached: bool
    key: str


def build_dataset(root: str | Path, split: str, img_size: int, indices: list[int] | None = None
                  ) -> ImageFolderDataset:
    """Deterministic eval view of a split (resize + center crop); corrupt images raise so rows stay aligned."""
    return ImageFolderDataset(root, split, eval_transform(img_size), on_corrupt="raise", indices=indices)


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type in ("cuda", "cpu"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def effective_precision(device: torch.device, precision: str) -> str:
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


@torch.no_grad()
def _run(encoder: FrozenEncoder, loader, mode: str, layers: int, accelerator, precision: str, progress: bool
         ) -> tuple[torch.Tensor, torch.Tensor]:
    device = accelerator.device
    autocast = _autocast(device, precision)
    feats, labels = [], []
    bar = tqdm(loader, desc=f"features ({mode})", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    for images, batch_labels in bar:
        images, batch_labels = images.to(device, non_blocking=True), batch_labels.to(device)
        with autocast():
            if mode == "tokens":
                out = encoder.tokens(images).to(torch.float16)
            else:
                out = torch.cat([layer.float().mean(1) for layer in encoder.layers(images, layers)], dim=1)
        out, batch_labels = accelerator.gather_for_metrics((out.contiguous(), batch_labels))
        feats.append(out.cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(feats), torch.cat(labels).long()


def extract_features(encoder: FrozenEncoder, dataset: ImageFolderDataset, mode: str, accelerator, *,
                     layers: int = 1, batch_size: int = 128, num_workers: int = 4, precision: str = "auto",
                     cache_dir: str | Path = "", progress: bool = True) -> FeatureSet:
    """Features of every sample of ``dataset`` (in order), from the cache when the key matches.

    Collective under ``accelerate launch``: every process extracts its shard; the main process writes the cache.
    """
    if mode not in MODES:
        raise ValueError(f"feature mode '{mode}' is unknown (expected one of {list(MODES)})")
    precision = effective_precision(accelerator.device, precision)
    description = dict(encoder=encoder.fingerprint, data=data_fingerprint(dataset.samples, dataset.classes),
                       transform=repr(dataset.transform), mode=mode, layers=layers if mode == "pooled" else 1,
                       precision=precision)
    key = cache_key(description)
    hit = load_entry(cache_dir, key)
    if hit is not None:
        return FeatureSet(hit[0], hit[1], dataset.classes, dataset.samples, True, key)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_labelled, pin_memory=accelerator.device.type == "cuda")
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    encoder.to(accelerator.device)
    features, labels = _run(encoder, loader, mode, layers, accelerator, precision, progress)
    if len(labels) != len(dataset):
        raise RuntimeError(f"extracted {len(labels)} feature rows for {len(dataset)} samples")
    if accelerator.is_main_process:
        save_entry(cache_dir, key, features, labels, description)
    accelerator.wait_for_everyone()
    return FeatureSet(features, labels, dataset.classes, dataset.samples, False, key)
