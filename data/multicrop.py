"""Multi-crop views (LeJEPA, DINO-style): per image, ``V_g`` global and ``V_l`` local random-resized crops with
flips, colour jitter, grayscale, Gaussian blur and solarization.

    workers: decode (uint8) -> every view's crop + flip (uint8) -> ColorParams of every view, drawn from the
             sample's seeded RNG (seed, epoch, index), so a resumed run replays them
    device:  uint8 -> [0, 1] -> apply_color (batched over every view of the batch) -> ImageNet normalisation

``augment.where=device`` applies the colour augmentation in the device transform (at 128 px the loader is the
limit, so the float work moves to the GPU); ``workers`` applies the same functions to each image's views in the
DataLoader workers (the CPU path) and ships uint8 views. Both read the same parameters.

Batch: ``views`` = ``MultiView(crops=[(B, V_g, 3, S, S), (B, V_l, 3, s, s)], color=ColorParams (B, V))``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from .batch import Batch, MultiView
from .folder import ImageFolderDataset
from .loaders import _loader, register_pipeline
from .sampler import EpochBatchSampler
from .transforms import DeviceNormalize

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # torchvision RandomSolarize(threshold=128) on uint8 images
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # jitter operations, in ``ColorParams.order``
_IDENTITY = 4  # no jitter operation


@dataclass
class ColorParams:
    """Colour augmentation of views, every field (...,) over views (``order``: (..., 4)).

    brightness / contrast / saturation: blend factors (1: unchanged); hue: shift in turns (0: unchanged);
    order: the permutation in which the four jitter operations run; grayscale / solarize: bool; blur_sigma: the
    Gaussian blur's sigma in pixels (0: no blur).
    """

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor

    def views(self, start: int, stop: int) -> "ColorParams":
        """The parameters of views ``start:stop`` (the last view axis)."""
        return ColorParams(**{f.name: (getattr(self, f.name)[..., start:stop, :] if f.name == "order"
                                       else getattr(self, f.name)[..., start:stop])
                              for f in dataclasses.fields(self)})

    def flatten(self) -> "ColorParams":
        """(B, V) fields -> (B * V,) (``order``: (B * V, 4))."""
        return ColorParams(**{f.name: (getattr(self, f.name).reshape(-1, 4) if f.name == "order"
                                       else getattr(self, f.name).reshape(-1)) for f in dataclasses.fields(self)})

    @staticmethod
    def stack(params: list["ColorParams"]) -> "ColorParams":
        """Per-image (V,) parameters -> (B, V)."""
        return ColorParams(**{f.name: torch.stack([getattr(p, f.name) for p in params])
                              for f in dataclasses.fields(ColorParams)})


def sample_color_params(num_views: int, augment) -> ColorParams:
    """(num_views,) parameters drawn from the torch RNG (the dataset seeds it per sample). ``augment`` has
    ``jitter_prob``, ``brightness``, ``contrast``, ``saturation``, ``hue`` (torchvision ColorJitter's ranges:
    factors uniform in [max(0, 1 - s), 1 + s], hue in [-h, h], a random order), ``grayscale_prob``,
    ``blur_prob``, ``blur_sigma`` (low, high), ``solarize_prob``."""
    a = augment
    jitter = torch.rand(num_views) < a.jitter_prob

    def factor(strength: float) -> torch.Tensor:
        low, high = max(0.0, 1.0 - strength), 1.0 + strength
        return torch.where(jitter, low + torch.rand(num_views) * (high - low), torch.ones(num_views))

    brightness, contrast, saturation = factor(a.brightness), factor(a.contrast), factor(a.saturation)
    hue = torch.where(jitter, (2 * torch.rand(num_views) - 1) * a.hue, torch.zeros(num_views))
    order = torch.argsort(torch.rand(num_views, 4), dim=1)
    grayscale = torch.rand(num_views) < a.grayscale_prob
    blur = torch.rand(num_views) < a.blur_prob
    low, high = a.blur_sigma
    sigma = torch.where(blur, low + torch.rand(num_views) * (high - low), torch.zeros(num_views))
    solarize = torch.rand(num_views) < a.solarize_prob
    return ColorParams(brightness, contrast, saturation, hue, order, grayscale, sigma, solarize)


# ------------------------------------------------------------------------------------------------ colour ops
def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    (wr, wg, wb), (r, g, b) = GRAY_WEIGHTS, images.split(1, dim=1)
    return wr * r + wg * g + wb * b  # Python-scalar weights: no tensor to copy to the device


def _blend(images: torch.Tensor, op: torch.Tensor, params: ColorParams) -> torch.Tensor:
    """One jitter step: each image n runs operation ``op[n]`` (brightness, contrast or saturation: a blend
    f * x + (1 - f) * anchor with anchor 0, the mean luma or the luma image; anything else: unchanged)."""
    ones = torch.ones_like(params.brightness)
    factors = torch.stack([params.brightness, params.contrast, params.saturation, ones, ones])  # (5, N)
    factor = factors.gather(0, op.clamp_max(_IDENTITY).unsqueeze(0)).view(-1, 1, 1, 1)
    luma = grayscale(images)
    op = op.view(-1, 1, 1, 1)
    anchor = torch.where(op == BRIGHTNESS, torch.zeros_like(luma),
                         torch.where(op == CONTRAST, luma.mean((1, 2, 3), keepdim=True), luma))
    return (factor * images + (1 - factor) * anchor).clamp(0, 1)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV, hue in turns [0, 1)."""
    r, g, b = images.unbind(1)
    maxc, minc = images.amax(1), images.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    saturation = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, maxc], 1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) HSV (hue in turns) -> RGB."""
    hue, saturation, value = images.unbind(1)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6
    p = value * (1 - saturation)
    q = value * (1 - saturation * frac)
    t = value * (1 - saturation * (1 - frac))
    choices = {  # the channel values of each of the six hue sectors
        "r": torch.stack([value, q, p, p, t, value]),
        "g": torch.stack([t, value, value, q, p, p]),
        "b": torch.stack([p, p, t, value, value, q]),
    }
    index = sector.unsqueeze(0)
    return torch.stack([choices[c].gather(0, index)[0] for c in "rgb"], 1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (N,) turns; images with shift 0 are returned unchanged."""
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    shifted = hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], 1)).clamp(0, 1)
    return torch.where((shift != 0).view(-1, 1, 1, 1), shifted, images)


def color_jitter(images: torch.Tensor, params: ColorParams) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in each image's own ``order``, batched: the blends before the hue
    step, the hue step (computed once), the blends after it."""
    hue_slot = (params.order == HUE).int().argmax(1)
    identity = torch.full_like(hue_slot, _IDENTITY)
    for slot in range(3):  # a blend before the hue step sits in slots 0-2
        images = _blend(images, torch.where(hue_slot > slot, params.order[:, slot], identity), params)
    images = adjust_hue(images, params.hue)
    for slot in range(1, 4):
        images = _blend(images, torch.where(hue_slot < slot, params.order[:, slot], identity), params)
    return images


def blur_kernel_size(side: int) -> int:
    """An odd kernel of about 10% of the crop side (DINO: 23 px at 224), at least 3."""
    return max(3, int(0.1 * side) | 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of each image with its own ``sigma`` (N,) (reflect padding, as torchvision's);
    images with sigma 0 are returned unchanged."""
    n, c, h, w = images.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-3).view(-1, 1)).square())
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N * C, K)
    x = F.pad(images.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return torch.where((sigma > 0).view(-1, 1, 1, 1), x.view(n, c, h, w), images)


def apply_color(images: torch.Tensor, params: ColorParams, kernel_size: int | None = None) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] with (N,) parameters -> augmented (N, 3, H, W): jitter (each image's order),
    grayscale, Gaussian blur, solarize, as DINO's and LeJEPA's pipelines order them."""
    images = color_jitter(images, params)
    images = torch.where(params.grayscale.view(-1, 1, 1, 1), grayscale(images).expand_as(images), images)
    images = gaussian_blur(images, params.blur_sigma, kernel_size or blur_kernel_size(images.shape[-1]))
    solarize = params.solarize.view(-1, 1, 1, 1) & (images >= SOLARIZE_THRESHOLD)
    return torch.where(solarize, 1 - images, images)


# ------------------------------------------------------------------------------------------------ workers
class CropGroup(NamedTuple):
    size: int  # output side in pixels
    scale: tuple[float, float]  # RandomResizedCrop area range
    views: int


class MultiCropTransform:
    """uint8 (3, H, W) -> ``{'crops': [(V_i, 3, S_i, S_i) uint8 per group], 'color': ColorParams (V,) | None}``.

    Each view is its own random-resized crop (aspect 3/4-4/3) and flip; ``color_in_workers`` applies the colour
    augmentation here (then ``color`` is None), otherwise the device transform applies ``color``. The randomness
    is the torch RNG, which ``ImageFolderDataset`` seeds per (seed, epoch, index).
    """

    def __init__(self, groups: list[CropGroup], augment, hflip: bool = True, color_in_workers: bool = False,
                 interpolation: str = "bilinear"):
        mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[interpolation]
        self.groups = [g for g in groups if g.views > 0]
        self.crops = [v2.RandomResizedCrop(g.size, scale=tuple(g.scale), interpolation=mode, antialias=True)
                      for g in self.groups]
        self.augment, self.hflip, self.color_in_workers = augment, hflip, color_in_workers

    def __call__(self, image: torch.Tensor) -> dict:
        crops = []
        for group, crop in zip(self.groups, self.crops):
            views = []
            for _ in range(group.views):
                view = crop(image)
                views.append(view.flip(-1) if self.hflip and torch.rand(()) < 0.5 else view)
            crops.append(torch.stack(views))
        color = sample_color_params(sum(g.views for g in self.groups), self.augment)
        if self.color_in_workers:
            crops = [to_uint8(apply_color(views.float() / 255, params)) for views, params in
                     zip(crops, split_views(color, [g.views for g in self.groups]))]
            color = None
        return {"crops": crops, "color": color}


def split_views(color: ColorParams, counts: list[int]) -> list[ColorParams]:
    """The parameters of each crop group, in crop order."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [color.views(start, start + count) for start, count in zip(starts, counts)]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


class MultiCropCollator:
    """Dataset items (``image``: a ``MultiCropTransform`` output, None when skipped) -> ``Batch(pixels=None,
    views=MultiView(crops (B, V_i, 3, S_i, S_i) uint8, color (B, V) | None), labels, skipped)``."""

    def __call__(self, items: list) -> Batch:
        kept = [item for item in items if item["image"] is not None]
        if not kept:
            raise RuntimeError(f"every image of a batch of {len(items)} was corrupt; check data.root")
        groups = len(kept[0]["image"]["crops"])
        crops = [torch.stack([item["image"]["crops"][i] for item in kept]) for i in range(groups)]
        color = None if kept[0]["image"]["color"] is None else ColorParams.stack([i["image"]["color"] for i in kept])
        return Batch(pixels=None, views=MultiView(crops, color), labels=torch.tensor([i["label"] for i in kept]),
                     skipped=torch.tensor(len(items) - len(kept)))


# ------------------------------------------------------------------------------------------------ device
class MultiCropDeviceTransform:
    """On the device: uint8 views -> colour augmentation from ``views.color`` (all views of a crop size in one
    batched call, fp32) -> ImageNet-normalised float views; ``color`` is None afterwards. Pixels, if any, are
    normalised as ``DeviceNormalize`` does."""

    def __init__(self):
        self.normalize = DeviceNormalize()

    def __call__(self, batch: Batch) -> Batch:
        batch = self.normalize(batch)
        views = batch.views
        if views is None or views.crops[0].dtype != torch.uint8:
            return batch
        groups = split_views(views.color, list(views.num_views)) if views.color is not None else None
        crops = []
        for i, crop in enumerate(views.crops):
            x = crop.flatten(0, 1).float() / 255  # (B * V_i, 3, S, S)
            if groups is not None:
                x = apply_color(x, groups[i].flatten())
            crops.append(self.normalize.normalize(x).view(crop.shape))
        return dataclasses.replace(batch, views=MultiView(crops, None))


@register_pipeline("multicrop_images", device_transform=lambda cfg: MultiCropDeviceTransform())
def multicrop_images(cfg, parts, rank: int = 0, world_size: int = 1, pin_memory: bool = True):
    """``data.global_views`` crops of ``data.img_size`` (area ``data.crop_scale``) and ``data.local_views`` of
    ``data.local_size`` (``data.local_scale``) of every ``data.root/train`` image, colour augmentation by
    ``cfg.augment`` (``where``: device | workers)."""
    d, a = cfg.data, cfg.augment
    groups = [CropGroup(d.img_size, d.crop_scale, d.global_views), CropGroup(d.local_size, d.local_scale,
                                                                               d.local_views)]
    transform = MultiCropTransform(groups, a, hflip=d.hflip, color_in_workers=a.where == "workers",
                                   interpolation=d.interpolation)
    dataset = ImageFolderDataset(d.root, "train", transform, on_corrupt=d.on_corrupt, seed=cfg.trainer.seed)
    batch_sampler = EpochBatchSampler(len(dataset), d.batch_size, seed=cfg.trainer.seed, rank=rank,
                                      world_size=world_size)
    return _loader(dataset, batch_sampler, MultiCropCollator(), cfg, pin_memory), batch_sampler
