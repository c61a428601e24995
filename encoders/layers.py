"""Small layer helpers shared by encoders and predictors."""
from __future__ import annotations

import torch


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each of ``depth`` blocks: linear from 0 to ``drop_path`` (the ViT convention)."""
    return torch.linspace(0, drop_path, depth).tolist() if depth > 0 else []
