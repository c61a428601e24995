"""The one batch type every collator builds and every method reads.

    Batch(pixels, masks=[MaskBatch, ...], text={...} | None, labels=(B,) | None, skipped=scalar, tokens=None,
          views=None)

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

``batch.to(device)`` moves every tensor, recursively (lists, dicts, dataclasses such as ``MaskBatch``);
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
class Batch:
    pixels: torch.Tensor | None
    masks: list[MaskBatch] = field(default_factory=list)
    text: dict[str, torch.Tensor] | None = None
    labels: torch.Tensor | None = None
    skipped: torch.Tensor = field(default_factory=lambda: torch.tensor(0))
    tokens: torch.Tensor | None = None
    views: MultiView | None = None

    def __len__(self) -> int:
        for tensor in (self.pixels, self.tokens):
            if tensor is not None:
                return tensor.shape[0]
        return self.views.crops[0].shape[0]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return map_tensors(self, lambda t: t.pin_memory())
