"""The cached-token path: a frozen X-encoder's tokens of every image, computed once and memory-mapped.

    cache = TokenCache.build(source.images, encoder, img_size=224, folder="cache/", dtype="bf16")
    cache[i] -> (N, D) tokens of image i (bf16 or fp32);  cache.missing: images that were corrupt (rows of zeros)

Every image is seen in one fixed view (``fixed_view_transform``: short side resized to ``img_size``, center crop,
uint8), normalised as ``data.transforms.DeviceNormalize`` does, and encoded under ``torch.no_grad`` (bf16 autocast on
CUDA). The tokens go to ``folder/<key>.bin``, a raw (num_images, N, D) array (bf16 stored as uint16, float32 as is),
and ``folder/<key>.json`` (shape, dtype, image-list hash, encoder fingerprint, img_size, missing rows, ``complete``).

``key`` = SHA-256 of (encoder fingerprint, each image's absolute path, size and mtime, img_size, dtype): a changed
weight, image, size or dtype gives a new cache, an unchanged one is reused without running the encoder. Both files
are written under temporary names and renamed, the JSON (the completion marker) last, so a crash never leaves a cache
that looks complete. Under ``torch.distributed`` rank 0 builds while the other ranks wait on a barrier.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from .batch import Batch
from .folder import CorruptImageError, load_rgb_uint8
from .transforms import DeviceNormalize

logger = logging.getLogger(__name__)

# cache dtype name -> (torch dtype of the tokens, numpy dtype on disk)
CACHE_DTYPES = {"bf16": (torch.bfloat16, np.uint16), "fp32": (torch.float32, np.float32)}


def fixed_view_transform(img_size: int) -> v2.Compose:
    """(3, H, W) uint8 -> (3, img_size, img_size) uint8: short side resized (bicubic, antialiased), center crop. The
    one view the token cache encodes, and the uncached VL pipeline's view with ``data.augment=False``."""
    return v2.Compose([v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(img_size)])


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 of the module's class and of every state_dict entry (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def image_list_hash(images: list[Path]) -> str:
    """SHA-256 of each image's absolute path, size and mtime (ns), in order."""
    digest = hashlib.sha256()
    for path in images:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(images_hash: str, fingerprint: str, img_size: int, dtype: str) -> str:
    return hashlib.sha256(f"{fingerprint}|{images_hash}|{img_size}|{dtype}".encode()).hexdigest()


class _ImageList(torch.utils.data.Dataset):
    """(index, fixed-view (3, S, S) uint8 image | None when corrupt and skipped)."""

    def __init__(self, images: list[Path], img_size: int, on_corrupt: str):
        self.images, self.transform, self.on_corrupt = images, fixed_view_transform(img_size), on_corrupt

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(load_rgb_uint8(self.images[index]))
        except CorruptImageError as err:
            if self.on_corrupt == "raise":
                raise
            logger.warning("token cache: skipping %s", err)
            return index, None


def _collate_images(items):
    kept = [(index, image) for index, image in items if image is not None]
    missing = [index for index, image in items if image is None]
    if not kept:
        return None, None, missing
    return torch.tensor([index for index, _ in kept]), torch.stack([image for _, image in kept]), missing


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class TokenCache:
    """Read side: ``cache[i]`` -> (N, D) tokens of image i in the cache dtype, from a memory map opened lazily in each
    process (DataLoader workers included). ``missing``: indices of images that were corrupt (their rows are zero)."""

    def __init__(self, folder: Path, key: str, meta: dict):
        self.folder, self.key, self.meta = Path(folder), key, meta
        self.path = self.folder / f"{key}.bin"
        self.dtype = meta["dtype"]
        self.shape = tuple(meta["shape"])  # (num_images, N, D)
        self.missing = set(meta["missing"])
        self._array, self._pid = None, None

    @property
    def tokens_shape(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"], state["_pid"] = None, None
        return state

    def _rows(self) -> np.memmap:
        if self._array is None or self._pid != os.getpid():
            self._array = np.memmap(self.path, dtype=CACHE_DTYPES[self.dtype][1], mode="r", shape=self.shape)
            self._pid = os.getpid()
        return self._array

    def __getitem__(self, image_index: int) -> torch.Tensor:
        if not 0 <= image_index < len(self):
            raise IndexError(f"image index {image_index} is outside the token cache of {len(self)} images")
        row = np.array(self._rows()[image_index])  # a copy: the tensor must not pin the memory map
        if self.dtype == "bf16":
            return torch.from_numpy(row.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(row)

    @classmethod
    def open(cls, folder: str | Path, key: str) -> "TokenCache | None":
        """The complete cache ``folder/<key>``, or None when it is absent or was never finished."""
        folder = Path(folder)
        meta_path, bin_path = folder / f"{key}.json", folder / f"{key}.bin"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("complete") is not True or meta.get("dtype") not in CACHE_DTYPES or not bin_path.is_file():
            return None
        expected = int(np.prod(meta["shape"])) * np.dtype(CACHE_DTYPES[meta["dtype"]][1]).itemsize
        if bin_path.stat().st_size != expected:
            return None
        return cls(folder, key, meta)

    @classmethod
    def build(cls, images: list[Path], encoder: nn.Module, img_size: int, folder, dtype: str = "bf16", device=None,
              batch_size: int = 64, num_workers: int = 2, on_corrupt: str = "skip",
              encoder_fingerprint: str | None = None) -> "TokenCache":
        """The cache of ``encoder``'s tokens (B, N, D) of every image (reused when complete, else built).

        ``device``: where to run the encoder (None: where its weights are; it is moved there for the build and back).
        ``encoder_fingerprint``: identifies the weights (None: hashed from the state_dict). ``on_corrupt``: 'skip'
        (a zero row, listed in ``missing``, logged) or 'raise'.
        """
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"data.cache_dtype '{dtype}' is unknown (expected one of {sorted(CACHE_DTYPES)})")
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"data.on_corrupt '{on_corrupt}' is unknown (expected 'skip' or 'raise')")
        if not images:
            raise ValueError("token cache: the image list is empty")
        images = [Path(p) for p in images]
        folder = Path(folder)
        fingerprint = encoder_fingerprint or module_fingerprint(encoder)
        images_hash = image_list_hash(images)
        key = cache_key(images_hash, fingerprint, img_size, dtype)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_rank() == 0:
            if cls.open(folder, key) is None:
                folder.mkdir(parents=True, exist_ok=True)
                meta = {"num_images": len(images), "images_sha256": images_hash, "encoder_fingerprint": fingerprint,
                        "img_size": img_size, "dtype": dtype}
                _write(folder, key, meta, images, encoder, img_size, dtype, device, batch_size, num_workers,
                       on_corrupt)
            else:
                logger.info("token cache: reusing %s", folder / f"{key}.bin")
        if distributed:
            torch.distributed.barrier()
        cache = cls.open(folder, key)
        if cache is None:
            raise RuntimeError(f"token cache '{folder / key}.bin' is not complete after its build (was it written by "
                               f"rank 0 to a folder this process does not share?)")
        return cache


def _write(folder: Path, key: str, meta: dict, images: list[Path], encoder: nn.Module, img_size: int, dtype: str,
           device, batch_size: int, num_workers: int, on_corrupt: str) -> None:
    torch_dtype, np_dtype = CACHE_DTYPES[dtype]
    for stale in folder.glob(f"{key}.*.tmp*"):  # left by a crashed build
        stale.unlink()
    bin_tmp, meta_tmp = folder / f"{key}.bin.tmp{os.getpid()}", folder / f"{key}.json.tmp{os.getpid()}"
    home = _module_device(encoder)
    device = torch.device(device) if device is not None else home
    was_training = encoder.training
    # its own generator: building a cache must not draw from the process RNG (dropout after a first build would
    # then differ from a run that found the cache, and resume would not be exact)
    loader = torch.utils.data.DataLoader(_ImageList(images, img_size, on_corrupt), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate_images,
                                         generator=torch.Generator().manual_seed(0))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    normalize = DeviceNormalize()
    rows, missing = None, []
    logger.info("token cache: encoding %d images into %s", len(images), folder / f"{key}.bin")
    encoder.to(device).eval()
    try:
        with torch.no_grad(), autocast:
            for indices, pixels, skipped in loader:
                missing += skipped
                if pixels is None:
                    continue
                tokens = encoder(normalize(Batch(pixels=pixels.to(device))).pixels)
                if tokens.dim() != 3:
                    raise ValueError(f"token cache: the encoder returned shape {tuple(tokens.shape)}, expected "
                                     f"(B, N, D) tokens")
                if rows is None:
                    rows = np.memmap(bin_tmp, dtype=np_dtype, mode="w+", shape=(len(images), *tokens.shape[1:]))
                tokens = tokens.to(torch_dtype).cpu()
                if dtype == "bf16":
                    tokens = tokens.view(torch.int16)
                rows[indices.numpy()] = tokens.numpy().view(np_dtype)
    finally:
        encoder.to(home).train(was_training)
    if rows is None:
        raise CorruptImageError(f"token cache: every one of the {len(images)} images was corrupt or unreadable")
    shape = list(rows.shape)
    rows.flush()
    del rows
    os.replace(bin_tmp, folder / f"{key}.bin")
    meta = {**meta, "shape": shape, "missing": sorted(missing), "complete": True}
    meta_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(meta_tmp, folder / f"{key}.json")
    if missing:
        logger.warning("token cache: %d corrupt images have zero rows (skipped by the dataset)", len(missing))
