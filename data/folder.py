"""ImageNet-style folder dataset: ``<root>/<split>/<class>/<image>``, a ``data.labelled.LabelledSource``.

A corrupt or unreadable image is skipped (counted, logged) or raises, by ``on_corrupt``; the collator drops
skipped samples and reports how many it dropped.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, read_file

from .labelled import LabelledSource

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAYOUT = "an ImageNet-style folder with train/<class>/*.JPEG and val/<class>/*.JPEG"


class CorruptImageError(RuntimeError):
    """An image file could not be decoded; the message names the file."""


def scan_split(root: str | Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """[(path, class index)], sorted class names; errors name the missing or empty folder."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise FileNotFoundError(f"data.root '{root}' does not exist (expected {LAYOUT})")
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data.root '{root}' has no '{split}/' folder (expected {LAYOUT})")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"'{split_dir}' holds no class folders (expected {LAYOUT})")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(
                f"class folder '{split_dir / name}' holds no images (expected files ending in {IMAGE_EXTENSIONS})"
            )
        samples += [(path, label) for path in files]
    return samples, classes


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CorruptImageError(f"corrupt or unreadable image '{path}': {err}") from err


def load_rgb_uint8(path: Path) -> torch.Tensor:
    """(3, H, W) uint8, decoded by torchvision (libjpeg-turbo / libpng), about 3x cheaper than PIL + convert."""
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as err:
        raise CorruptImageError(f"corrupt or unreadable image '{path}': {err}") from err


class ImageFolderDataset(LabelledSource):
    """Items are dicts ``{'image': (3, H, W) float | None (skipped), 'label': int, 'index': int}``, plus
    ``'epoch'``/``'batch'`` when indexed by a sampler key.

    ``__getitem__`` takes an int or a key ``(index, epoch, batch_index)`` from ``EpochBatchSampler``; with a key,
    the transform's randomness is seeded from ``(seed, epoch, index)`` so augmentations replay exactly on
    resume, whatever the number of workers.
    """

    def __init__(self, root: str | Path, split: str, transform: Callable, on_corrupt: str = "skip", seed: int = 0,
                 indices: list[int] | None = None, decode: str = "pil"):
        """``decode='pil'`` gives the transform a PIL RGB image, ``'tensor'`` a (3, H, W) uint8 tensor."""
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"data.on_corrupt '{on_corrupt}' is unknown (expected 'skip' or 'raise')")
        samples, self.classes = scan_split(root, split)
        self.samples = samples if indices is None else [samples[i] for i in indices]
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.seed = seed
        if decode not in ("pil", "tensor"):
            raise ValueError(f"decode '{decode}' is unknown (expected 'pil' or 'tensor')")
        self.load = load_rgb if decode == "pil" else load_rgb_uint8

    def __getitem__(self, key):
        index, epoch, batch = (key, None, None) if isinstance(key, int) else key
        path, label = self.samples[index]
        item = {"image": None, "label": label, "index": index}
        if epoch is not None:
            item.update(epoch=epoch, batch=batch)
        try:
            image = self.load(path)
        except CorruptImageError as err:
            if self.on_corrupt == "raise":
                raise
            logger.warning("skipping %s", err)
            return item
        if epoch is None:
            item["image"] = self.transform(image)
            return item
        with torch.random.fork_rng(devices=[]):  # leave the process RNG (dropout, drop-path) untouched
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
            item["image"] = self.transform(image)
        return item
