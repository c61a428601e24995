"""Collator that stacks images and samples the multi-block masks in the DataLoader worker."""
from __future__ import annotations

import torch

from jepa.masks import MultiBlockMaskSampler


class MaskCollator:
    """list of dataset items (``image`` None = skipped) -> batch dict

    ``images`` (B, 3, H, W), ``labels`` (B,), ``context_idx``/``context_pad`` (B, Nc), ``target_idx`` (B, n, Nt),
    ``skipped`` (number of items dropped). Masks are seeded by ``(seed, epoch, batch index)`` of the batch.
    """

    def __init__(self, mask_sampler: MultiBlockMaskSampler, seed: int):
        self.mask_sampler = mask_sampler
        self.seed = seed

    def __call__(self, items: list) -> dict:
        kept = [item for item in items if item["image"] is not None]
        if not kept:
            raise RuntimeError(f"every image of a batch of {len(items)} was corrupt; check data.root")
        images = torch.stack([item["image"] for item in kept])
        labels = torch.tensor([item["label"] for item in kept])
        first = items[0]
        masks = self.mask_sampler(len(kept), (self.seed, first.get("epoch", 0), first.get("batch", 0)))
        return {
            "images": images,
            "labels": labels,
            "context_idx": masks.context_idx,
            "context_pad": masks.context_pad,
            "target_idx": masks.target_idx,
            "skipped": torch.tensor(len(items) - len(kept)),
        }

