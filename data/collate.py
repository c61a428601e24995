"""Collator that stacks images and samples the multi-block masks in the DataLoader worker."""
from __future__ import annotations

import torch

from jepa.masks import MultiBlockMaskSampler

from .batch import Batch, EncodedImages
from .jpeg_crop import CroppedJpeg


class MaskCollator:
    """list of dataset items (``image`` None = skipped) -> ``Batch`` with ``pixels`` (B, 3, H, W), ``labels`` (B,),
    one mask set per sampler in ``masks`` and ``skipped`` (items dropped). Masks are seeded by ``(seed, epoch, batch
    index)`` of the batch (and the sampler's position, when there are several). Items whose ``image`` is a
    ``CroppedJpeg`` (``data.decode=device``) give ``encoded`` (``EncodedImages``: the files, (B, 5) crop boxes, (B,)
    flips) and ``pixels`` None instead."""

    def __init__(self, mask_samplers: MultiBlockMaskSampler | list[MultiBlockMaskSampler], seed: int):
        self.mask_samplers = mask_samplers if isinstance(mask_samplers, list) else [mask_samplers]
        self.seed = seed

    def __call__(self, items: list) -> Batch:
        kept = [item for item in items if item["image"] is not None]
        if not kept:
            raise RuntimeError(f"every item (image or clip) of a batch of {len(items)} was corrupt or too short; check "
                               f"data.root or the manifests")
        first = items[0]
        key = (self.seed, first.get("epoch", 0), first.get("batch", 0))
        masks = [sampler(len(kept), key if i == 0 else (*key, i)) for i, sampler in enumerate(self.mask_samplers)]
        images = [item["image"] for item in kept]
        encoded = None
        if isinstance(images[0], CroppedJpeg):
            encoded = EncodedImages.pack([i.data for i in images], [i.box for i in images], [i.flip for i in images],
                                         [i.path for i in images])
        return Batch(
            pixels=None if encoded is not None else torch.stack(images),
            encoded=encoded,
            masks=masks,
            labels=torch.tensor([item["label"] for item in kept]),
            skipped=torch.tensor(len(items) - len(kept)),
        )
