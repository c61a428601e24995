"""The one batch type every collator builds and every method reads.

    Batch(pixels, masks=[MaskBatch, ...], text={...} | None, labels=(B,) | None, skipped=scalar, tokens=None,
          views=None, encoded=None)

- ``pixels``: images (B, C, H, W) or clips (B, C, T, H, W); uint8 out of the workers (4x less to pin and copy),
  float after the device transform (``data.transforms.DeviceNormalize``).
- ``masks``: one ``jepa.masks.MaskBatch`` per mask set (I-JEPA: one multi-block set; V-JEPA: one per mask
  generator), indices into the flattened token grid.
- ``text``: tokenized text by role, e.g. ``{"query": {"input_ids", "attention_mask"} (B, L), "target": {...}}``,
  or None.
- ``labels``: class labels (B,) where the source has them, else None.
- ``skipped``: 0-d long tensor, how many items of the batch were dropped (corrupt files).
- ``tokens``: precomputed input-encoder tokens (B, N, D) (bf16 or fp32) when the pipeline reads a token cache; then
  ``pixels`` is None.
- ``views``: multi-crop views (LeJEPA) as a ``MultiView``, with ``pixels`` None.
- ``encoded``: the batch's JPEG files, not yet decoded, with their crop boxes and flips (``EncodedImages``,
  ``data.decode=device``), with ``pixels`` None until the device transform (``data.device_decode``) decodes them.

``batch.to(device)`` moves every tensor, recursively (lists, dicts, dataclasses such as ``MaskBatch``), except the
encoded bytes, which stay in host memory (the JPEG decoder reads them there, whatever device it decodes on);
``pin_memory()`` is what the DataLoader calls with ``pin_memory=True``; ``len(batch)`` is the number of samples.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from jepa.masks import MaskBatch


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside it (tensors, lists, tuples, dicts, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


@dataclass
class MultiView:
    """Several augmented views of each image (``data.multicrop``).

    - ``crops``: one tensor (B, V_i, C, H_i, W_i) per crop size, global views first (LeJEPA: global, local);
      uint8 out of the workers, normalised floats after the device transform;
    - ``color``: the per-view colour-augmentation parameters (``data.multicrop.ColorParams``, fields (B, V, ...)
      over all views in crop order) that the device transform applies, or None once applied (or applied in the
      workers).
    """

    crops: list[torch.Tensor]
    color: Any = None

    @property
    def num_views(self) -> tuple[int, ...]:
        return tuple(crop.shape[1] for crop in self.crops)


@dataclass
class EncodedImages:
    """The JPEG files of a batch, read but not decoded (``data.decode=device``), and how to crop each.

    - ``data``: (L,) uint8, every file's bytes back to back: one buffer leaves a DataLoader worker through one
      shared-memory block, where B separate tensors would need B;
    - ``offsets``: (B + 1,) long, file b is ``data[offsets[b]:offsets[b + 1]]`` (``files()``);
    - ``boxes``: (B, 5) float32, ``(b, x1, y1, x2, y2)``: row b's random-resized-crop box in pixels of its decoded
      image, pixel k spanning [k, k + 1) (``torchvision.ops.roi_align``'s format with ``aligned=True``);
    - ``flips``: (B,) bool, flip the crop horizontally;
    - ``paths``: the B file paths (what errors name).

    ``to(device)`` moves ``boxes`` and ``flips``; ``data`` and ``offsets`` stay on the host.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    paths: list[str]

    @staticmethod
    def pack(files: list[torch.Tensor], boxes: list[tuple[float, float, float, float]], flips: list[bool],
             paths: list[str]) -> "EncodedImages":
        """B files ((L_b,) uint8), boxes ``(x1, y1, x2, y2)`` and flips -> one ``EncodedImages``."""
        sizes = torch.tensor([0] + [len(f) for f in files])
        rows = torch.arange(len(files), dtype=torch.float32).unsqueeze(1)
        return EncodedImages(data=torch.cat(files), offsets=sizes.cumsum(0),
                             boxes=torch.cat([rows, torch.tensor(boxes, dtype=torch.float32).view(-1, 4)], 1),
                             flips=torch.tensor(flips, dtype=torch.bool), paths=list(paths))

    def __len__(self) -> int:
        return len(self.paths)

    def files(self) -> list[torch.Tensor]:
        """The B files as (L_b,) uint8 views into ``data`` (host memory)."""
        bounds = self.offsets.tolist()
        return [self.data[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]

    def to(self, device, non_blocking: bool = False) -> "EncodedImages":
        return dataclasses.replace(self, boxes=self.boxes.to(device, non_blocking=non_blocking),
                                   flips=self.flips.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "EncodedImages":
        # the bytes are not copied to the device by us (the decoder stages them itself): pinning them buys nothing
        return dataclasses.replace(self, boxes=self.boxes.pin_memory(), flips=self.flips.pin_memory())


@dataclass
class Batch:
    pixels: torch.Tensor | None
    masks: list[MaskBatch] = field(default_factory=list)
    text: dict[str, torch.Tensor] | None = None
    labels: torch.Tensor | None = None
    skipped: torch.Tensor = field(default_factory=lambda: torch.tensor(0))
    tokens: torch.Tensor | None = None
    views: MultiView | None = None
    encoded: EncodedImages | None = None

    def __len__(self) -> int:
        for tensor in (self.pixels, self.tokens):
            if tensor is not None:
                return tensor.shape[0]
        if self.encoded is not None:
            return len(self.encoded)
        return self.views.crops[0].shape[0]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = map_tensors(dataclasses.replace(self, encoded=None), lambda t: t.to(device, non_blocking=non_blocking))
        if self.encoded is None:
            return moved
        return dataclasses.replace(moved, encoded=self.encoded.to(device, non_blocking))

    def pin_memory(self) -> "Batch":
        pinned = map_tensors(dataclasses.replace(self, encoded=None), lambda t: t.pin_memory())
        if self.encoded is None:
            return pinned
        return dataclasses.replace(pinned, encoded=self.encoded.pin_memory())
