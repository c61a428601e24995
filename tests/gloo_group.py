"""A two-process gloo group for the multi-process tests, torn down so that no rank exits while a peer still talks.

``destroy_process_group`` right after a rank's last collective can abort the other rank ("terminate called without
an active exception": gloo's pair threads are destroyed while the peer's socket is still open); a barrier first lets
every rank finish its collectives before any one tears the group down.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world: int, rendezvous: str):
    """Join a gloo group through the (new) file ``rendezvous``; on leaving, barrier then destroy."""
    torch.set_num_threads(1)  # each rank on its own core, off the parent's thread pool
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
