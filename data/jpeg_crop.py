"""Worker side of ``data.decode=device``: a JPEG file's bytes and its random-resized crop and flip, not decoded.

    read_jpeg(path) -> JpegFile(data (L,) uint8, height, width, path)            the dataset's ``decoder``
    JpegCropParams(crop_scale, hflip)(JpegFile) -> CroppedJpeg(data, box, flip, path)   the dataset's transform

The box and the flip are drawn by torchvision's own ``RandomResizedCrop.get_params`` and ``RandomHorizontalFlip``'s
test (``torch.rand(1) < 0.5``), in the order of ``data.transforms.pretrain_transform`` (crop, then flip), from the
RNG that ``ImageFolderDataset`` seeds per (seed, epoch, index): a sample gets the same crop and flip under
``data.decode=cpu`` and ``device``, so both are deterministic per (seed, epoch, index) and resume replays them.

Only the header is parsed here (PIL, with its pixel limit): a file that does not start with the JPEG marker
``ffd8``, is not a JPEG to PIL, or is a CMYK / YCCK JPEG (nvJPEG decodes grayscale and YCbCr ones to RGB) raises
``CorruptImageError`` naming it, which ``data.on_corrupt`` skips (counted) or raises, as on the CPU path. Bytes that
pass the header but do not decode are found on the device (``data.device_decode``).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torchvision.transforms import RandomResizedCrop

from .folder import CorruptImageError, open_header

JPEG_SOI = b"\xff\xd8"  # every JPEG stream starts with the start-of-image marker
DEVICE_MODES = ("L", "RGB")  # PIL's modes of the JPEGs decoded on the device (grayscale, YCbCr)
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: multi-picture JPEG (cameras); its first picture is a plain JPEG stream
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop default, as pretrain_transform uses it
HOW_TO_FIX = "data.decode=device reads JPEG files only: use data.decode=cpu, or re-encode the folder with `jepa data " \
             "reencode`"


class JpegFile(NamedTuple):
    data: torch.Tensor  # (L,) uint8, the whole file
    height: int
    width: int
    path: str


class CroppedJpeg(NamedTuple):
    data: torch.Tensor  # (L,) uint8, the whole file
    box: tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels of the decoded image, pixel k spans [k, k+1)
    flip: bool
    path: str


def read_jpeg(path: str | Path) -> JpegFile:
    """The bytes and size of a JPEG file, header checked; ``CorruptImageError`` naming the file otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CorruptImageError(f"corrupt or unreadable image '{path}': {type(err).__name__}: {err}") from err
    if data[:2] != JPEG_SOI:
        raise CorruptImageError(f"image '{path}' is not a JPEG file (it starts with '{data[:4].hex()}', not the JPEG "
                                f"marker 'ffd8'); {HOW_TO_FIX}")
    try:
        with open_header(data) as image:
            kind, mode, (width, height) = image.format, image.mode, image.size
    except Exception as err:  # PIL reports a bad header as several exception types
        raise CorruptImageError(f"corrupt or unreadable image '{path}': {type(err).__name__}: {err}") from err
    if kind not in JPEG_FORMATS or mode not in DEVICE_MODES:
        raise CorruptImageError(f"image '{path}' is a {mode} {kind} file, which the device decoder does not read "
                                f"(expected a grayscale or YCbCr JPEG); {HOW_TO_FIX}")
    return JpegFile(torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width, str(path))


class JpegCropParams:
    """``JpegFile`` -> ``CroppedJpeg``: the random-resized crop (area fraction ``crop_scale``, aspect 3/4-4/3) and,
    with ``hflip``, the horizontal flip that ``pretrain_transform`` would apply, drawn from the torch RNG."""

    def __init__(self, crop_scale=(0.3, 1.0), hflip: bool = False):
        self.crop_scale, self.hflip = [float(s) for s in crop_scale], hflip

    def __call__(self, jpeg: JpegFile) -> CroppedJpeg:
        shape_only = torch.empty((), dtype=torch.uint8).expand(3, jpeg.height, jpeg.width)  # get_params reads the size
        top, left, height, width = RandomResizedCrop.get_params(shape_only, self.crop_scale, list(CROP_RATIO))
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        return CroppedJpeg(jpeg.data, (float(left), float(top), float(left + width), float(top + height)), flip,
                           jpeg.path)

    def __repr__(self) -> str:
        return f"JpegCropParams(crop_scale={tuple(self.crop_scale)}, hflip={self.hflip})"
