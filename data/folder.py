"""ImageNet-style folder dataset: ``<root>/<split>/<class>/<image>``, a ``data.labelled.LabelledSource``.

Labels: a root has one class list, its ``train/`` split's class folders (sorted), and every split is labelled by it,
so a class missing from ``val/`` shifts no label; a class folder of another split that ``train/`` lacks is an error
naming it (a root without ``train/`` labels a split by its own class folders). A class folder that is a broken
symlink is an error naming it.

Decoding: ``load_rgb_uint8`` is the one image decoder of every loader (pretraining, monitors, evaluation, token
caches); it reads every extension of ``IMAGE_EXTENSIONS``. Pretraining with ``data.decode=device`` is the exception:
its workers read JPEG bytes (``data.jpeg_crop.read_jpeg``, header checked by ``open_header``) that the device decodes
(``data.device_decode``). A corrupt or unreadable image is skipped (counted, logged) or raises, by ``on_corrupt``; the
collator drops skipped samples and reports how many it dropped.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from .labelled import LabelledSource

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # all read by load_rgb_uint8
LAYOUT = "an ImageNet-style folder with train/<class>/*.JPEG and val/<class>/*.JPEG"
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's 16-bit grayscale modes


class CorruptImageError(RuntimeError):
    """An image file could not be decoded; the message names the file."""


# ------------------------------------------------------------------------------------------------------ folders
def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders of ``split_dir``; a broken symlink among them is an error naming it
    (it would otherwise drop a class, and shift the labels after it, without a word)."""
    names = []
    for entry in split_dir.iterdir():
        if entry.is_symlink() and not entry.exists():
            raise FileNotFoundError(f"class folder '{entry}' is a broken symlink (to '{entry.readlink()}'); fix "
                                    f"or remove it")
        if entry.is_dir():
            names.append(entry.name)
    return sorted(names)


def root_classes(root: str | Path, split: str) -> list[str]:
    """The class list that labels every split of ``root``: the class folders of ``train/`` (of ``split`` itself
    when the root has no ``train/``)."""
    train_dir = Path(root) / "train"
    return class_folders(train_dir if train_dir.is_dir() else Path(root) / split)


def scan_split(root: str | Path, split: str, classes: list[str] | None = None
               ) -> tuple[list[tuple[Path, int]], list[str]]:
    """[(path, class index)], the class names the indices point into (``classes``, default ``root_classes``);
    errors name the missing or empty folder, or a class folder that is not in the class list."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise FileNotFoundError(f"data.root '{root}' does not exist (expected {LAYOUT})")
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data.root '{root}' has no '{split}/' folder (expected {LAYOUT})")
    present = class_folders(split_dir)
    if not present:
        raise FileNotFoundError(f"'{split_dir}' holds no class folders (expected {LAYOUT})")
    classes = list(classes) if classes is not None else root_classes(root, split)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in present if name not in index]
    if unknown:
        raise FileNotFoundError(f"class folder(s) {unknown[:5]} of '{split_dir}' are not classes of '{root / 'train'}' "
                                f"({len(classes)} classes, e.g. {classes[:3]}); every split is labelled by train's "
                                f"class list")
    samples = []
    for name in present:
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(
                f"class folder '{split_dir / name}' holds no images (expected files ending in {IMAGE_EXTENSIONS})"
            )
        samples += [(path, index[name]) for path in files]
    return samples, classes


# ----------------------------------------------------------------------------------------------------- decoding
def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 of torchvision's output: the first frame of an animation, 16-bit samples to their high byte."""
    if pixels.dim() == 4:
        pixels = pixels[0]
    if pixels.dtype == torch.uint16:
        pixels = (pixels.to(torch.int32) >> 8).to(torch.uint8)
    return pixels


def _pil_rgb_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an opened PIL image (BMP, TIFF, ...); 16-bit grayscale to its high byte."""
    if image.mode in SIXTEEN_BIT_MODES:
        gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return torch.from_numpy(gray).expand(3, *gray.shape).contiguous()
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


@contextlib.contextmanager
def open_header(data: bytes) -> Iterator[Image.Image]:
    """PIL's view of an encoded image, header read only (format, mode, size), with its pixel limit
    (``Image.MAX_IMAGE_PIXELS``, the warning band included) raised as an error inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            yield image


def load_rgb_uint8(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file: the one decoder of every loader.

    PIL reads the header first (format, size; its ``Image.MAX_IMAGE_PIXELS`` limit guards against decompression
    bombs, the warning band included); torchvision decodes JPEG / PNG / WebP (libjpeg-turbo / libpng, about 3x
    cheaper than PIL), PIL every other format. Any failure raises ``CorruptImageError`` naming the file."""
    try:
        data = Path(path).read_bytes()
        with open_header(data) as image:
            try:
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return _to_uint8(decode_image(encoded, mode=ImageReadMode.RGB))
            except RuntimeError:  # a format torchvision does not read (BMP, TIFF): PIL decodes it
                return _pil_rgb_uint8(image)
    except Exception as err:  # a bad file surfaces as many exception types (OSError, SyntaxError, bomb errors...)
        raise CorruptImageError(f"corrupt or unreadable image '{path}': {type(err).__name__}: {err}") from err


# ------------------------------------------------------------------------------------------------------ dataset
class ImageFolderDataset(LabelledSource):
    """Items are dicts ``{'image': (3, H, W) | None (skipped), 'label': int, 'index': int}``, plus
    ``'epoch'``/``'batch'`` when indexed by a sampler key and ``'error'`` (why) for a skipped image.

    The transform gets the (3, H, W) uint8 tensor of ``load_rgb_uint8``. ``__getitem__`` takes an int or a key
    ``(index, epoch, batch_index)`` from ``EpochBatchSampler``; with a key, the transform's randomness is seeded from
    ``(seed, epoch, index)`` so augmentations replay exactly on resume, whatever the number of workers.
    ``classes`` fixes the class list (default: the root's, ``root_classes``). ``decoder`` reads a file into what the
    transform takes (default ``load_rgb_uint8``; ``data.jpeg_crop.read_jpeg`` keeps the JPEG bytes for decoding on
    the device); the ``CorruptImageError`` it raises is skipped or raised by ``on_corrupt``.
    """

    def __init__(self, root: str | Path, split: str, transform: Callable, on_corrupt: str = "skip", seed: int = 0,
                 indices: list[int] | None = None, classes: list[str] | None = None,
                 decoder: Callable[[Path], object] = load_rgb_uint8):
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"data.on_corrupt '{on_corrupt}' is unknown (expected 'skip' or 'raise')")
        samples, self.classes = scan_split(root, split, classes)
        self.samples = samples if indices is None else [samples[i] for i in indices]
        self.location = str(Path(root) / split)
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.seed = seed
        self.decoder = decoder

    def __getitem__(self, key):
        index, epoch, batch = (key, None, None) if isinstance(key, int) else key
        path, label = self.samples[index]
        item = {"image": None, "label": label, "index": index}
        if epoch is not None:
            item.update(epoch=epoch, batch=batch)
        try:
            image = self.decoder(path)
        except CorruptImageError as err:
            if self.on_corrupt == "raise":
                raise
            logger.warning("skipping %s", err)
            item["error"] = str(err)
            return item
        if epoch is None:
            item["image"] = self.transform(image)
            return item
        with torch.random.fork_rng(devices=[]):  # leave the process RNG (dropout, drop-path) untouched
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
            item["image"] = self.transform(image)
        return item
