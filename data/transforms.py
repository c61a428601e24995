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

    def __init__(self):
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """ImageNet mean and std (1, 3, 1, 1) in [0, 1] units on ``device``, copied there once (a host-to-device copy
        of a fresh tensor at every batch would wait for the GPU queue)."""
        if device not in self._stats:
            self._stats[device] = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                                   torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
        return self._stats[device]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, ...) float in [0, 1] -> normalised, any number of trailing dims."""
        mean, std = self.stats(images.device)
        shape = (1, 3) + (1,) * (images.dim() - 2)
        return (images - mean.view(shape)) / std.view(shape)

    def __call__(self, batch):
        pixels = batch.pixels
        if pixels is not None and pixels.dtype == torch.uint8:
            batch = dataclasses.replace(batch, pixels=self.normalize(pixels.float() / 255))
        return batch


def eval_transform(img_size: int) -> v2.Compose:
    """(3, H, W) uint8 image (``data.folder.load_rgb_uint8``) -> (3, S, S) float normalised with the ImageNet
    statistics: the short side resized to ``img_size``, a square center crop."""
    return v2.Compose([v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(img_size)] + _to_normalized_tensor())
