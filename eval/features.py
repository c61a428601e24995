"""Batched frozen-feature extraction (bf16 on GPU, progress bar, multi-process under ``accelerate launch``),
through the on-disk cache.

Modes:
- ``pooled``: (N, k*D) float32 — each of the last k layers mean-pooled over tokens, concatenated (k=1: the
  mean-pooled last layer); ``pool_layers`` is the one pooling, shared with the training kNN monitor.
- ``tokens``: (N, T, k*D) float16 — every token of the last k layers, concatenated along channels (k=1: the
  last layer's tokens; the attentive probe's input).

Clip sources (``data.labelled.ClipViews``) give every video V = ``num_clips * num_crops`` views, batches
(B, V, C, T, H, W): the views go through the encoder as B * V clips; ``pooled`` averages them into one (N, k*D) row
per video (for a linear probe, the same as averaging its logits over the views), ``tokens`` keeps them apart,
(N, V, T, D), for the attentive probe to average its predictions.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
from tqdm.auto import tqdm

from data.labelled import ClipSettings, LabelledSource, labelled_loader, open_labelled_source
from jepa.config import ConfigError, knob
from jepa.precision import autocast_context, resolve_precision

from .cache import cache_key, load_entry, save_entry
from .encoders import FrozenEncoder

MODES = ("pooled", "tokens")


@dataclass
class FeatureConfig:
    img_size: int = knob(0, ge=0)  # 0: the encoder's training data.img_size (224 for timm: encoders)
    batch_size: int = knob(128, gt=0)  # per process
    num_workers: int = knob(4, ge=0)
    layers: int = knob(1, gt=0)  # the last `layers` blocks, concatenated: pooled each, or token by token (tokens)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    cache_dir: str = ""  # "": $OPENJEPA_CACHE or ~/.cache/openjepa/features
    progress_bar: bool = True
    timm_seed: int = 0  # random init of timm:<name> encoders (part of the cache key through the weights)
    # clip sources (video manifests, class folders of videos); 0: the video encoder's training data.<key>
    frames_per_clip: int = knob(0, ge=0)
    frame_step: int = knob(0, ge=0)
    num_clips: int = knob(1, gt=0)  # clips per video at uniform temporal positions (views, averaged)
    num_crops: int = knob(1, gt=0)  # square crops per clip along the long side: 1 centre, 3 both ends + centre
    label_columns: list[str] = knob(factory=list)  # manifest label columns, one probe each ([]: the one label)

    def check(self, prefix: str) -> None:
        if len(set(self.label_columns)) != len(self.label_columns):
            raise ConfigError(f"config key '{prefix}label_columns' names a column twice: {self.label_columns}")


@dataclass
class FeatureSet:
    """features (N, F) float32, (N, T, D) float16, or (N, V, T, D) float16 (tokens of V views per video);
    labels (N,) long; ``cached``: read from the cache."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    samples: list[tuple[Path, int]]
    cached: bool
    key: str
    num_views: int = 1  # views per video of a clip source (pooled features are already averaged over them)


def build_dataset(root: str | Path, split: str, img_size: int, indices: list[int] | None = None,
                  clips: ClipSettings | None = None, label_column: str | None = None,
                  classes: list[str] | None = None) -> LabelledSource:
    """Deterministic eval view of a split (images: resize + center crop; clips: ``clips.num_clips`` uniform clips
    x ``clips.num_crops`` crops); corrupt files raise so rows stay aligned."""
    return open_labelled_source(root, split, img_size, on_corrupt="raise", indices=indices, clips=clips,
                                label_column=label_column, classes=classes)


def pool_layers(layers: list[torch.Tensor]) -> torch.Tensor:
    """[(B, N_i, D_i)] -> (B, sum_i D_i) float32: every layer mean-pooled over its tokens, concatenated."""
    return torch.cat([layer.float().mean(1) for layer in layers], dim=1)


def stack_layer_tokens(layers: list[torch.Tensor]) -> torch.Tensor:
    """[(B, N, D_i)] -> (B, N, sum_i D_i) float16: the layers' tokens concatenated along channels."""
    counts = {layer.shape[1] for layer in layers}
    if len(counts) != 1:
        raise ValueError(f"token features of {len(layers)} layers need one token count per layer, got "
                         f"{[layer.shape[1] for layer in layers]} (features.layers={len(layers)}; use 1 for this "
                         "encoder)")
    return torch.cat(layers, dim=2).to(torch.float16)


@torch.no_grad()
def encode_batches(batches: Iterable, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                   autocast=contextlib.nullcontext, gather: Callable | None = None, to_cpu: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode(pixels)`` of every ``(pixels, labels)`` batch under ``autocast()``; returns (features (N, ...),
    labels (N,) long), gathered over processes by ``gather((features, labels))`` when given, on the CPU or the
    device. A None batch (every file of it skipped as corrupt) is passed over; with none left, both are empty."""
    feats, labels = [], []
    for batch in batches:
        if batch is None:
            continue
        images, batch_labels = batch
        images, batch_labels = images.to(device, non_blocking=True), batch_labels.to(device)
        with autocast():
            out = encode(images)
        if gather is not None:
            out, batch_labels = gather((out.contiguous(), batch_labels))
        feats.append(out.cpu() if to_cpu else out)
        labels.append(batch_labels.cpu() if to_cpu else batch_labels)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels).long()


def over_views(encode: Callable[[torch.Tensor], torch.Tensor], average: bool
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode`` of (B, ...) pixels -> the same on (B, V, C, T, H, W) views: every view encoded, then (B, V, ...)
    or, ``average``, the mean over the views (B, ...). Pixels without a view axis go straight through."""

    def run(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 6:
            return encode(pixels)
        out = encode(pixels.flatten(0, 1)).unflatten(0, pixels.shape[:2])
        return out.mean(1) if average else out

    return run


def extract_features(encoder: FrozenEncoder, dataset: LabelledSource, mode: str, accelerator, *,
                     layers: int = 1, batch_size: int = 128, num_workers: int = 4, precision: str = "auto",
                     cache_dir: str | Path = "", progress: bool = True) -> FeatureSet:
    """Features of every sample of ``dataset`` (in order), from the cache when the key matches.

    Collective under ``accelerate launch``: every process extracts its shard; the main process writes the cache.
    """
    if mode not in MODES:
        raise ValueError(f"feature mode '{mode}' is unknown (expected one of {list(MODES)})")
    device = accelerator.device
    precision = resolve_precision(precision, device.type)
    description = dict(encoder=encoder.fingerprint, data=dataset.fingerprint(), transform=repr(dataset.transform),
                       mode=mode, layers=layers, precision=precision)
    key = cache_key(description)
    views = getattr(dataset, "num_views", 1)
    hit = load_entry(cache_dir, key)
    if hit is not None:
        return FeatureSet(hit[0], hit[1], dataset.classes, dataset.samples, True, key, views)
    loader = labelled_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    encoder.to(device)
    if mode == "tokens":
        encode = over_views(lambda pixels: stack_layer_tokens(encoder.layers(pixels, layers)), average=False)
    else:
        encode = over_views(lambda pixels: pool_layers(encoder.layers(pixels, layers)), average=True)
    bar = tqdm(loader, desc=f"features ({mode})", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    features, labels = encode_batches(bar, encode, device, autocast_context(precision, device.type),
                                      gather=accelerator.gather_for_metrics, to_cpu=True)
    if len(labels) != len(dataset):
        raise RuntimeError(f"extracted {len(labels)} feature rows for {len(dataset)} samples")
    if accelerator.is_main_process:
        save_entry(cache_dir, key, features, labels, description)
    accelerator.wait_for_everyone()
    return FeatureSet(features, labels, dataset.classes, dataset.samples, False, key, views)
