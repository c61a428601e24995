"""Multi-block mask sampling (I-JEPA, V-JEPA) on a token grid of any rank, vectorised over the batch.

One call draws, for a batch of B images on an (H, W) token grid (or clips on a (T, H, W) grid):
- ``num_targets`` target blocks per image. As in I-JEPA, the block *size* (scale, aspect) is drawn once per
  batch, so every target block holds exactly ``h * w`` tokens and the targets stack to (B, num_targets, h*w).
- ``num_context`` context blocks per image (their union), minus every target token of that image; with
  ``num_context=0`` the context is every token outside the targets (V-JEPA).

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
    """Indices into the flattened token grid (raster order: H*W, or T*H*W).

    context_idx: (B, Nc) long, ascending raster order; padding entries hold 0.
    context_pad: (B, Nc) bool, True at padding (all False in ``truncate`` mode).
    target_idx:  (B, num_targets, Nt) long, ascending raster order within each block; with ``target_union`` one
                 set (B, 1, Nt): the union of the blocks (V-JEPA), whose ragged lengths are padded as the context's.
    target_pad:  (B, num_targets, Nt) bool, True at padding, or None (every target block has the same size).
    context_padded / target_padded: whether any entry of ``context_pad`` / ``target_pad`` is True, known on the
                 host where the masks are drawn, so the step can leave attention unmasked (SDPA's flash path) without
                 reading the device mask back.
    """

    context_idx: torch.Tensor
    context_pad: torch.Tensor
    target_idx: torch.Tensor
    target_pad: torch.Tensor | None = None
    context_padded: bool = True
    target_padded: bool = True

    @property
    def context_attention_pad(self) -> torch.Tensor | None:
        """``context_pad`` where it pads anything, else None (no attention mask needed)."""
        return self.context_pad if self.context_padded else None

    @property
    def target_attention_pad(self) -> torch.Tensor | None:
        """``target_pad`` where it pads anything, else None."""
        return self.target_pad if self.target_pad is not None and self.target_padded else None

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


def block_shape(rng: np.random.Generator, grid: tuple[int, ...], scale, aspect, leading_scale=(1.0, 1.0),
                reachable_edges: bool = True) -> tuple[int, ...]:
    """One block shape on a grid of any rank >= 2: the last two axes (rows, columns) by ``block_size``; each leading
    axis (time) spans a fraction drawn from ``leading_scale`` of its length (at least 1)."""
    h, w = block_size(rng, scale, aspect, grid[-2], grid[-1], reachable_edges)
    leading = tuple(min(max(int(round(rng.uniform(*leading_scale) * n)), 1), n) for n in grid[:-2])
    return (*leading, h, w)


def block_masks(rng: np.random.Generator, shape: tuple[int, ...], block: tuple[int, ...], grid: tuple[int, ...],
                reachable_edges: bool = True) -> np.ndarray:
    """Boolean masks (*shape, *grid) of ``block``-shaped boxes at uniform positions (corners drawn axis by axis).

    With ``reachable_edges`` False the row/column corner is drawn from ``[0, n - b)`` as in the official code, so a
    block never touches the last row/column; leading (time) axes always use ``[0, n - b]``."""
    rank = len(grid)
    inside = np.ones((*shape, *grid), dtype=bool)
    for axis, (n, b) in enumerate(zip(grid, block)):
        edge = 0 if reachable_edges or axis < rank - 2 else 1
        start = rng.integers(0, n - b + 1 - edge, size=shape).reshape(*shape, *([1] * rank))
        coords = np.arange(n).reshape(*([1] * len(shape)), *[n if a == axis else 1 for a in range(rank)])
        inside &= (coords >= start) & (coords < start + b)
    return inside


class MultiBlockMaskSampler:
    """Multi-block sampler for a token grid of any rank: (H, W) images, (T, H, W) video.

    sampler(batch_size, seed_key) -> MaskBatch; ``seed_key`` is a tuple of ints, e.g. (seed, epoch, batch).
    ``*_leading_scale``: the fraction of each leading (time) axis a block spans (rank >= 3 grids only).
    ``target_union``: the targets are the union of the ``num_targets`` blocks, one set per sample (V-JEPA), instead
    of one set per block (I-JEPA).
    """

    def __init__(
        self,
        grid_size: tuple[int, ...],
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
        target_leading_scale=(1.0, 1.0),
        context_leading_scale=(1.0, 1.0),
        target_union: bool = False,
    ):
        if equalize not in ("pad", "truncate"):
            raise ValueError(f"masks.equalize '{equalize}' is unknown (expected 'pad' or 'truncate')")
        self.grid = tuple(int(n) for n in grid_size)
        if len(self.grid) < 2 or min(self.grid) < 1:
            raise ValueError(f"mask token grid {grid_size} must have rank >= 2 and positive sizes")
        self.num_tokens = math.prod(self.grid)
        if min_keep > self.num_tokens:
            raise ValueError(f"masks.min_keep {min_keep} exceeds the {'x'.join(map(str, self.grid))} token grid")
        self.num_targets = num_targets
        self.target_scale, self.target_aspect = tuple(target_scale), tuple(target_aspect)
        self.num_context = num_context
        self.context_scale, self.context_aspect = tuple(context_scale), tuple(context_aspect)
        self.target_leading_scale, self.context_leading_scale = tuple(target_leading_scale), tuple(context_leading_scale)
        self.min_keep = min_keep
        self.target_union = target_union
        self.equalize = equalize
        self.reachable_edges = reachable_edges
        self.max_tries = max_tries

    def __call__(self, batch_size: int, seed_key: tuple[int, ...]) -> MaskBatch:
        rng = np.random.default_rng([int(k) for k in seed_key])
        grid, edges = self.grid, self.reachable_edges
        target_block = block_shape(rng, grid, self.target_scale, self.target_aspect, self.target_leading_scale, edges)
        context_block = block_shape(rng, grid, self.context_scale, self.context_aspect, self.context_leading_scale,
                                    edges) if self.num_context else None

        def draw(k: int):
            targets = block_masks(rng, (k, self.num_targets), target_block, grid, edges)  # (k, n, *grid)
            if context_block is None:  # the context is the whole grid minus the targets (V-JEPA)
                return targets, ~targets.any(1)
            context = block_masks(rng, (k, self.num_context), context_block, grid, edges).any(1) & ~targets.any(1)
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
                f"{'x'.join(map(str, grid))} grid with target blocks {'x'.join(map(str, target_block))}; lower "
                f"masks.min_keep or masks.target_scale"
            )
        return self._to_indices(context.reshape(batch_size, -1), targets.reshape(batch_size, self.num_targets, -1),
                                math.prod(target_block))

    def _to_indices(self, context: np.ndarray, targets: np.ndarray, target_len: int) -> MaskBatch:
        """context (B, N) bool, targets (B, n, N) bool -> indices (the union of the blocks when ``target_union``)."""
        batch_size = context.shape[0]
        context_idx, context_pad = ragged_indices(context, self.equalize)
        if self.target_union:
            target_idx, target_pad = ragged_indices(targets.any(1), self.equalize)
            target_idx, target_pad = target_idx[:, None], target_pad[:, None]
        else:
            target_idx = np.nonzero(targets.reshape(-1, targets.shape[-1]))[1].reshape(batch_size, self.num_targets,
                                                                                       target_len)
            target_pad = None
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return MaskBatch(
            context_idx=as_tensor(context_idx).long(),
            context_pad=as_tensor(context_pad),
            target_idx=as_tensor(target_idx).long(),
            target_pad=None if target_pad is None else as_tensor(target_pad),
            context_padded=bool(context_pad.any()),
            target_padded=target_pad is not None and bool(target_pad.any()),
        )


def ragged_indices(rows: np.ndarray, equalize: str) -> tuple[np.ndarray, np.ndarray]:
    """(R, N) bool -> (indices (R, L) ascending, padding (R, L) bool). ``pad``: L = the longest row, padding
    entries hold index 0; ``truncate``: L = the shortest row, every row cut to its first L (the official cut)."""
    counts = rows.sum(1)
    order = np.argsort(~rows, axis=1, kind="stable")  # kept positions first, ascending
    if equalize == "truncate":
        length = int(counts.min())
        return order[:, :length], np.zeros((rows.shape[0], length), dtype=bool)
    length = int(counts.max())
    pad = np.arange(length)[None, :] >= counts[:, None]
    return np.where(pad, 0, order[:, :length]), pad
