"""Multi-block mask sampling (I-JEPA) on a patch grid, vectorised over the batch.

One call draws, for a batch of B images on an (H, W) token grid:
- ``num_targets`` target blocks per image. As in I-JEPA, the block *size* (scale, aspect) is drawn once per
  batch, so every target block holds exactly ``h * w`` tokens and the targets stack to (B, num_targets, h*w).
- ``num_context`` context blocks per image (their union), minus every target token of that image.

Differences from the official sampler, on purpose:
- Blocks may span the full grid and their top-left corner is drawn from ``[0, H - h]`` *inclusive*, so the
  last row and column are reachable (the official code draws from ``[0, H - h)`` and caps ``h`` at ``H - 1``).
- Every sampled context token is kept (``equalize='pad'``): ragged lengths are padded and a key-padding mask
  marks the padding. ``equalize='truncate'`` reproduces the official cut: indices sorted in raster order, cut to
  the batch minimum, which drops the bottom-right tokens of the longer contexts.
- The generator is seeded from ``(seed, epoch, batch_index)``: the same batch gets the same masks whatever the
  number of workers, and a resumed run draws exactly the masks of the uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MaskBatch:
    """Indices into the flattened (H*W) token grid.

    context_idx: (B, Nc) long, ascending raster order; padding entries hold 0.
    context_pad: (B, Nc) bool, True at padding (all False in ``truncate`` mode).
    target_idx:  (B, num_targets, Nt) long, ascending raster order within each block.
    """

    context_idx: torch.Tensor
    context_pad: torch.Tensor
    target_idx: torch.Tensor

    @property
    def context_lengths(self) -> torch.Tensor:
        return (~self.context_pad).sum(1)


def block_size(rng: np.random.Generator, scale, aspect, grid_h: int, grid_w: int,
               reachable_edges: bool = True) -> tuple[int, int]:
    """Draw one block (h, w) with area ~ scale * H * W and h/w ~ aspect, clipped to the grid
    (to ``H - 1``, ``W - 1`` when ``reachable_edges`` is False, as the official sampler does)."""
    s = rng.uniform(*scale)
    ratio = rng.uniform(*aspect)
    area = s * grid_h * grid_w
    h = int(round(math.sqrt(area * ratio)))
    w = int(round(math.sqrt(area / ratio)))
    edge = 0 if reachable_edges else 1
    return min(max(h, 1), grid_h - edge), min(max(w, 1), grid_w - edge)


def block_masks(rng: np.random.Generator, shape: tuple[int, ...], h: int, w: int, grid_h: int, grid_w: int,
                reachable_edges: bool = True):
    """Boolean masks (*shape, H, W) of h×w blocks at uniform positions.

    With ``reachable_edges`` False the top-left corner is drawn from ``[0, H - h)`` as in the official code,
    so a block never touches the last row/column."""
    edge = 0 if reachable_edges else 1
    top = rng.integers(0, grid_h - h + 1 - edge, size=shape)[..., None, None]
    left = rng.integers(0, grid_w - w + 1 - edge, size=shape)[..., None, None]
    rows = np.arange(grid_h)[:, None]
    cols = np.arange(grid_w)[None, :]
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


class MultiBlockMaskSampler:
    """I-JEPA multi-block sampler for an (H, W) token grid.

    sampler(batch_size, seed_key) -> MaskBatch; ``seed_key`` is a tuple of ints, e.g. (seed, epoch, batch).
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        num_targets: int = 4,
        target_scale=(0.15, 0.2),
        target_aspect=(0.75, 1.5),
        num_context: int = 1,
        context_scale=(0.85, 1.0),
        context_aspect=(1.0, 1.0),
        min_keep: int = 10,
        equalize: str = "pad",
        reachable_edges: bool = True,
        max_tries: int = 50,
    ):
        if equalize not in ("pad", "truncate"):
            raise ValueError(f"masks.equalize '{equalize}' is unknown (expected 'pad' or 'truncate')")
        self.grid_h, self.grid_w = grid_size
        if min_keep > self.grid_h * self.grid_w:
            raise ValueError(f"masks.min_keep {min_keep} exceeds the {self.grid_h}x{self.grid_w} token grid")
        self.num_targets = num_targets
        self.target_scale, self.target_aspect = tuple(target_scale), tuple(target_aspect)
        self.num_context = num_context
        self.context_scale, self.context_aspect = tuple(context_scale), tuple(context_aspect)
        self.min_keep = min_keep
        self.equalize = equalize
        self.reachable_edges = reachable_edges
        self.max_tries = max_tries

    def __call__(self, batch_size: int, seed_key: tuple[int, ...]) -> MaskBatch:
        rng = np.random.default_rng([int(k) for k in seed_key])
        H, W = self.grid_h, self.grid_w
        edges = self.reachable_edges
        th, tw = block_size(rng, self.target_scale, self.target_aspect, H, W, edges)
        ch, cw = block_size(rng, self.context_scale, self.context_aspect, H, W, edges)

        def draw(k: int):
            targets = block_masks(rng, (k, self.num_targets), th, tw, H, W, edges)  # (k, n, H, W)
            context = block_masks(rng, (k, self.num_context), ch, cw, H, W, edges).any(1) & ~targets.any(1)
            return targets, context

        targets, context = draw(batch_size)
        for _ in range(self.max_tries):
            short = context.reshape(batch_size, -1).sum(1) < self.min_keep
            if not short.any():
                break
            k = int(short.sum())  # redraw both target and context positions of the failing images only
            targets[short], context[short] = draw(k)
        else:
            raise ValueError(
                f"could not draw a context of masks.min_keep={self.min_keep} tokens in {self.max_tries} tries on a "
                f"{H}x{W} grid with target blocks {th}x{tw}; lower masks.min_keep or masks.target_scale"
            )
        return self._to_indices(context.reshape(batch_size, -1), targets.reshape(batch_size, self.num_targets, -1),
                                th * tw)

    def _to_indices(self, context: np.ndarray, targets: np.ndarray, target_len: int) -> MaskBatch:
        batch_size = context.shape[0]
        counts = context.sum(1)
        order = np.argsort(~context, axis=1, kind="stable")  # kept positions first, ascending
        if self.equalize == "truncate":
            length = int(counts.min())
            context_idx = order[:, :length]
            context_pad = np.zeros((batch_size, length), dtype=bool)
        else:
            length = int(counts.max())
            context_pad = np.arange(length)[None, :] >= counts[:, None]
            context_idx = np.where(context_pad, 0, order[:, :length])
        target_idx = np.nonzero(targets.reshape(-1, targets.shape[-1]))[1].reshape(batch_size, self.num_targets,
                                                                                   target_len)
        return MaskBatch(
            context_idx=torch.from_numpy(np.ascontiguousarray(context_idx)).long(),
            context_pad=torch.from_numpy(np.ascontiguousarray(context_pad)),
            target_idx=torch.from_numpy(np.ascontiguousarray(target_idx)).long(),
        )
