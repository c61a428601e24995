"""Pretraining data pipelines, registered by name; a method's spec names the one that builds its batches.

    loader, batch_sampler = build_pretrain_loader("masked_images", cfg, parts, rank, world_size)

A pipeline builder ``fn(cfg, parts, rank, world_size, pin_memory) -> (DataLoader, EpochBatchSampler)`` yields
``data.batch.Batch`` objects; ``parts`` is the method's ``MethodParts`` (read duck-typed: ``token_grid`` for the
mask samplers, ``tokenizer`` for text, ``input_encoder`` for a token cache). Masks are sampled in the workers.
A pipeline declares the ``data.decode`` values it implements (``decodes``); another value is an error naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from jepa.config import ConfigError
from jepa.masks import MultiBlockMaskSampler

from .collate import MaskCollator
from .device_decode import DeviceJpegDecode
from .folder import ImageFolderDataset, load_rgb_uint8
from .jpeg_crop import JpegCropParams, read_jpeg
from .sampler import EpochBatchSampler
from .transforms import DeviceNormalize, pretrain_transform

_PIPELINES: dict[str, Callable] = {}
_DEVICE_TRANSFORMS: dict[str, Callable] = {}
_DECODES: dict[str, tuple[str, ...]] = {}


def register_pipeline(name: str, device_transform: Callable | None = None, decodes: tuple[str, ...] = ("cpu",)):
    """Register ``fn(cfg, parts, rank, world_size, pin_memory)`` as pipeline ``name``; ``device_transform(cfg)``
    builds what turns its batches on the device into what the method reads (default: ``DeviceNormalize``);
    ``decodes``: the ``data.decode`` values it implements (cpu: decoding in the DataLoader workers)."""
    def wrap(fn):
        _PIPELINES[name] = fn
        _DECODES[name] = tuple(decodes)
        if device_transform is not None:
            _DEVICE_TRANSFORMS[name] = device_transform
        return fn

    return wrap


def _registered(pipeline: str, cfg) -> None:
    """Import the pipelines of other modules if needed; errors name an unknown pipeline or a ``data.decode`` value
    the pipeline does not implement."""
    if pipeline not in _PIPELINES:
        _import_pipelines()
    if pipeline not in _PIPELINES:
        raise ValueError(f"data pipeline '{pipeline}' is unknown (expected one of {sorted(_PIPELINES)})")
    decode = cfg.data.decode
    if decode not in _DECODES[pipeline]:
        others = sorted(name for name, modes in _DECODES.items() if decode in modes)
        raise ConfigError(f"config key 'data.decode' is '{decode}' but the '{pipeline}' pipeline of method "
                          f"'{cfg.method}' implements {list(_DECODES[pipeline])} only (data.decode={decode} is implemented by "
                          f"{others})")


def pipeline_device_transform(pipeline: str, cfg) -> Callable:
    """batch -> batch, applied by the trainer after the copy to the device: the pipeline's own transform (e.g.
    batched colour augmentation of multi-crop views) or ``DeviceNormalize`` (uint8 pixels -> normalised floats)."""
    _registered(pipeline, cfg)
    build = _DEVICE_TRANSFORMS.get(pipeline)
    return build(cfg) if build is not None else DeviceNormalize()


def build_pretrain_loader(pipeline: str, cfg, parts, rank: int = 0, world_size: int = 1, pin_memory: bool = True):
    """(DataLoader, EpochBatchSampler) of the named pipeline for the method's ``parts``."""
    _registered(pipeline, cfg)
    return _PIPELINES[pipeline](cfg, parts, rank, world_size, pin_memory)


def _import_pipelines() -> None:
    """Pipelines that live in other modules of ``data`` register on import."""
    import importlib

    for module in _PIPELINE_MODULES:
        importlib.import_module(module)


_PIPELINE_MODULES = ("data.vl", "data.multicrop")


def mask_sampler_from_config(cfg, grid_size: tuple[int, ...]) -> MultiBlockMaskSampler:
    m = cfg.masks
    return MultiBlockMaskSampler(grid_size, num_targets=m.num_targets, target_scale=m.target_scale,
                                 target_aspect=m.target_aspect, num_context=m.num_context,
                                 context_scale=m.context_scale, context_aspect=m.context_aspect,
                                 min_keep=m.min_keep, equalize=m.equalize, reachable_edges=m.reachable_edges)


def _loader(dataset, batch_sampler, collate_fn, cfg, pin_memory: bool) -> torch.utils.data.DataLoader:
    d = cfg.data
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=d.num_workers,
        pin_memory=pin_memory and d.pin_memory,
        persistent_workers=d.num_workers > 0,
        prefetch_factor=4 if d.num_workers > 0 else None,
        # worker seeds come from this generator, not the process RNG, so re-creating the iterator on resume
        # does not shift the RNG stream that dropout/drop-path draw from
        generator=torch.Generator().manual_seed(cfg.trainer.seed),
    )


def masked_images_device_transform(cfg) -> Callable:
    """``data.decode=device``: decode, crop and normalise on the device (``DeviceJpegDecode``); cpu:
    ``DeviceNormalize``."""
    d = cfg.data
    return DeviceJpegDecode(d.img_size, d.on_corrupt) if d.decode == "device" else DeviceNormalize()


@register_pipeline("masked_images", device_transform=masked_images_device_transform, decodes=("cpu", "device"))
def masked_images(cfg, parts, rank: int = 0, world_size: int = 1, pin_memory: bool = True):
    """Random-resized crops of ``data.root/train`` (uint8) with multi-block masks on ``parts.token_grid``; with
    ``data.decode=device`` the workers ship the JPEG files with their crop boxes and flips instead (``EncodedImages``),
    decoded by the device transform."""
    d = cfg.data
    if d.decode == "device":
        transform, decoder = JpegCropParams(d.crop_scale, d.hflip), read_jpeg
    else:
        transform, decoder = pretrain_transform(d.img_size, d.crop_scale, d.hflip), load_rgb_uint8
    dataset = ImageFolderDataset(d.root, "train", transform, on_corrupt=d.on_corrupt, seed=cfg.trainer.seed,
                                 decoder=decoder)
    batch_sampler = EpochBatchSampler(len(dataset), d.batch_size, seed=cfg.trainer.seed, rank=rank,
                                      world_size=world_size)
    collate = MaskCollator(mask_sampler_from_config(cfg, parts.token_grid), cfg.trainer.seed)
    loader = _loader(dataset, batch_sampler, collate, cfg, pin_memory)
    return loader, batch_sampler


def clip_mask_samplers(cfg, token_grid: tuple[int, ...]) -> list[MultiBlockMaskSampler]:
    """One sampler per V-JEPA block set (``masks.short_range``, ``masks.long_range``): the union of the set's blocks
    is the target, the rest of the clip the context."""
    m = cfg.masks
    return [MultiBlockMaskSampler(token_grid, num_targets=s.num_blocks, target_scale=s.spatial_scale,
                                  target_aspect=s.aspect, target_leading_scale=s.temporal_scale, num_context=0,
                                  target_union=True, min_keep=m.min_keep, equalize=m.equalize,
                                  reachable_edges=m.reachable_edges)
            for s in (m.short_range, m.long_range)]


def clip_source(cfg, split: str):
    """Where the clips of ``split`` are listed: ``data.<split>_manifest`` or the class folders ``data.root/<split>``."""
    manifest = getattr(cfg.data, f"{split}_manifest")
    if manifest:
        return manifest
    if not cfg.data.root:
        raise ValueError(f"config keys 'data.root' and 'data.{split}_manifest' are both empty (expected a folder with "
                         f"{split}/<class>/*.mp4 or a manifest of '<path> <label>' lines)")
    return Path(cfg.data.root) / split


def clip_dataset(cfg, split: str, transform, sampling: str, classes: list[str] | None = None):
    """The clips of ``split`` with the config's clip settings (``data.frames_per_clip``, ``frame_step`` / ``fps``,
    ``label_column``, ``on_corrupt``, ``decode_threads``)."""
    from .video import VideoClipDataset  # decord is needed only for video

    d = cfg.data
    return VideoClipDataset(clip_source(cfg, split), transform, frames_per_clip=d.frames_per_clip,
                            frame_step=d.frame_step, fps=d.fps or None, sampling=sampling, label_column=d.label_column,
                            classes=classes, on_corrupt=d.on_corrupt, seed=cfg.trainer.seed,
                            num_threads=d.decode_threads)


@register_pipeline("masked_clips")
def masked_clips(cfg, parts, rank: int = 0, world_size: int = 1, pin_memory: bool = True):
    """Random clips (one random-resized crop for all their frames, uint8 (C, T, H, W)) decoded by decord in the
    workers, with V-JEPA's short- and long-range masks on ``parts.token_grid``."""
    from .video import video_pretrain_transform

    d = cfg.data
    dataset = clip_dataset(cfg, "train", video_pretrain_transform(d.img_size, d.crop_scale, d.hflip), "random")
    batch_sampler = EpochBatchSampler(len(dataset), d.batch_size, seed=cfg.trainer.seed, rank=rank,
                                      world_size=world_size)
    loader = _loader(dataset, batch_sampler, MaskCollator(clip_mask_samplers(cfg, parts.token_grid), cfg.trainer.seed),
                     cfg, pin_memory)
    return loader, batch_sampler
