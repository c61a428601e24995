"""State tracking: Mamba-3's data-dependent rotation should let a 2-layer model learn the parity of 64-bit strings.

The model reads [BOS, b_1..b_64] left to right (forward scan) and predicts the running parity at every bit, with a
length curriculum 8 -> 16 -> 32 -> 64; accuracy is the parity of whole 64-bit strings. Required: >= 99% with rotation,
near chance without (paper: 100% vs 2.3% normalised). Real training on CPU, about two minutes for both models.

Status (recorded in benchmarks/MAMBA3_RESULTS.md): with rotation the model reaches 100% at lengths 8 and 16 within
~150 steps but stalls near 50% from length 32 on (the state must also learn to stop decaying: |Δ A| -> 0 while
Δ ~ 1 for a π turn); hence xfail until the recipe (steps, init of A, curriculum) is found.
"""
import pytest
import torch
import torch.nn as nn

from predictors.backbones.mamba3 import Mamba3Backbone

BITS = 64
BOS = 2
CURRICULUM = ((8, 100), (16, 100), (32, 150), (BITS, 250))  # (string length, steps)


class ParityModel(nn.Module):
    def __init__(self, use_rotation: bool, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(3, dim)
        self.backbone = Mamba3Backbone(dim, depth=2, mlp_ratio=2.0, d_state=16, headdim=16, expand=2,
                                       bidirectional="forward", use_rotation=use_rotation)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, bits):  # (B, L) long -> (B, L, 2) logits of the running parity
        tokens = torch.cat([torch.full_like(bits[:, :1], BOS), bits], dim=1)
        return self.head(self.norm(self.backbone(self.embed(tokens))))[:, 1:]


def train_parity(use_rotation: bool, seed: int = 0) -> float:
    """Train with the curriculum, then return the full-string parity accuracy on 2048 fresh 64-bit strings."""
    torch.manual_seed(seed)
    model = ParityModel(use_rotation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for length, steps in CURRICULUM:
        for _ in range(steps):
            bits = torch.randint(0, 2, (64, length))
            target = torch.cumsum(bits, dim=1) % 2
            loss = nn.functional.cross_entropy(model(bits).flatten(0, 1), target.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        bits = torch.randint(0, 2, (2048, BITS))
        predicted = model(bits)[:, -1].argmax(-1)
        return (predicted == bits.sum(1) % 2).float().mean().item()


@pytest.mark.xfail(reason="stalls near 50% beyond 16-bit strings (see module docstring)", strict=False)
def test_parity_needs_rotation():
    torch.set_num_threads(1)
    with_rotation = train_parity(use_rotation=True)
    without_rotation = train_parity(use_rotation=False)
    assert with_rotation >= 0.99, f"Mamba-3 with rotation reached only {with_rotation:.3f} parity accuracy"
    assert without_rotation <= 0.65, f"Mamba-3 without rotation reached {without_rotation:.3f} (expected ~0.5)"
