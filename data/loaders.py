"""DataLoaders for pretraining and for the kNN monitor."""
from __future__ import annotations

import torch

from jepa.config import Config
from jepa.masks import MultiBlockMaskSampler

from .collate import MaskCollator
from .folder import ImageFolderDataset
from .sampler import EpochBatchSampler
from .transforms import eval_transform, pretrain_transform


def mask_sampler_from_config(cfg: Config, grid_size: tuple[int, int]) -> MultiBlockMaskSampler:
    m = cfg.masks
    return MultiBlockMaskSampler(grid_size, num_targets=m.num_targets, target_scale=m.target_scale,
                                 target_aspect=m.target_aspect, num_context=m.num_context,
                                 context_scale=m.context_scale, context_aspect=m.context_aspect,
                                 min_keep=m.min_keep, equalize=m.equalize, reachable_edges=m.reachable_edges)


def build_pretrain_loader(cfg: Config, grid_size: tuple[int, int], rank: int = 0, world_size: int = 1,
                          pin_memory: bool = True):
    """(DataLoader, EpochBatchSampler) over ``data.root/train`` with masks sampled in the workers."""
    d = cfg.data
    dataset = ImageFolderDataset(d.root, "train", pretrain_transform(d.img_size, d.crop_scale, d.hflip),
                                 on_corrupt=d.on_corrupt, seed=cfg.trainer.seed, decode="tensor")
    batch_sampler = EpochBatchSampler(len(dataset), d.batch_size, seed=cfg.trainer.seed, rank=rank,
                                      world_size=world_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=MaskCollator(mask_sampler_from_config(cfg, grid_size), cfg.trainer.seed),
        num_workers=d.num_workers,
        pin_memory=pin_memory and d.pin_memory,
        persistent_workers=d.num_workers > 0,
        prefetch_factor=4 if d.num_workers > 0 else None,
        # worker seeds come from this generator, not the process RNG, so re-creating the iterator on resume
        # does not shift the RNG stream that dropout/drop-path draw from
        generator=torch.Generator().manual_seed(cfg.trainer.seed),
    )
    return loader, batch_sampler
