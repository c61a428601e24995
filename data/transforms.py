"""Image transforms (torchvision v2)."""
from __future__ import annotations

import dataclasses

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalized_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def pretrain_transform(img_size: int, crop_scale=(0.3, 1.0), hflip: bool = False) -> v2.Compose:
    """I-JEPA augmentation on a (3, H, W) uint8 tensor: RandomResizedCrop (scale 0.3-1.0) only, optionally a
    horizontal flip. Output stays uint8 (4x less to pin and copy); ``DeviceNormalize`` finishes on the GPU."""
    steps = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC,
                                  antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class DeviceNormalize:
    """``Batch`` with uint8 ``pixels`` (B, 3, H, W) or (B, 3, T, H, W) -> float32 pixels normalised with the
    ImageNet statistics, on whatever device the batch is."""

    def __call__(self, batch):
        pixels = batch.pixels
        if pixels is not None and pixels.dtype == torch.uint8:
            shape = (1, 3) + (1,) * (pixels.dim() - 2)
            mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(shape) * 255
            std = torch.tensor(IMAGENET_STD, device=pixels.device).view(shape) * 255
            batch = dataclasses.replace(batch, pixels=(pixels.float() - mean) / std)
        return batch


def eval_transform(img_size: int) -> v2.Compose:
    """Resize the short side to ``img_size`` and center-crop a square."""
    return v2.Compose([v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(img_size)] + _to_normalized_tensor())
