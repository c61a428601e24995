"""Resumable, rank-sharded batch sampler whose batches carry their (epoch, batch index)."""
from __future__ import annotations

import torch


class EpochBatchSampler(torch.utils.data.Sampler):
    """Yields batches of keys ``(sample index, epoch, global batch index)``.

    Each epoch is a permutation seeded by ``(seed, epoch)``, cut into ``len(self)`` batches per rank (the last
    incomplete global batch is dropped). Rank r takes global batches ``j * world_size + r``. ``set_position``
    chooses where the next iteration starts, so a resumed run continues the exact data order.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"dataset has {num_samples} samples, fewer than one global batch "
                f"(data.batch_size {batch_size} x {world_size} processes)"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for j in range(self.start, len(self)):
            global_batch = j * self.world_size + self.rank
            chunk = order[global_batch * self.batch_size:(global_batch + 1) * self.batch_size]
            yield [(index, self.epoch, global_batch) for index in chunk]
