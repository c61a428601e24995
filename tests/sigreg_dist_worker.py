"""The per-rank half of the two-process SIGReg test (tests/test_lejepa.py), in a module light to import: each
spawned process imports only torch and jepa.losses."""
import torch

from gloo_group import gloo_group
from jepa.losses import SIGReg


def full_views() -> torch.Tensor:
    """(V=2, B=12, D=6) embeddings, anisotropic so the statistic and its gradient are far from trivial."""
    generator = torch.Generator().manual_seed(5)
    return torch.randn(2, 12, 6, generator=generator) * torch.tensor([1.0, 0.4, 2.0, 1.0, 1.0, 0.7])


def sigreg_and_grad(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.clone().requires_grad_()
    loss = SIGReg(16, seed=3)(z)
    loss.backward()
    return loss.detach(), z.grad


def rank_main(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    with gloo_group(rank, world, rendezvous):
        rows = slice(0, 5) if rank == 0 else slice(5, 12)  # unequal shares: the counts are reduced too
        torch.save(sigreg_and_grad(full_views()[:, rows]), f"{out_dir}/rank{rank}.pt")
