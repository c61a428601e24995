"""Image transforms (torchvision v2)."""
from __future__ import annotations

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
    """batch dict with uint8 ``images`` (B, 3, H, W) -> float32 images normalised with the ImageNet statistics,
    on whatever device the batch is."""

    def __call__(self, batch: dict) -> dict:
        images = batch["images"]
        if images.dtype == torch.uint8:
            mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
            std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
            batch = dict(batch, images=(images.float() - mean) / std)
        return batch


def eval_transform(img_size: int) -> v2.Compose:
    """Resize the short side to ``img_size`` and center-crop a square."""
    return v2.Compose([v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(img_size)] + _to_normalized_tensor())
