"""Collapse monitor: feature std and effective rank of the features a method exposes (kNN: ``eval.monitor``)."""
from __future__ import annotations

import torch


@torch.no_grad()
def effective_rank(features: torch.Tensor, max_rows: int = 2048) -> torch.Tensor:
    """RankMe (Garrido et al., 2023): exp(entropy of the normalised singular values) of (N, D) features."""
    rows = features.detach().float().reshape(-1, features.shape[-1])[:max_rows]
    singular = torch.linalg.svdvals(rows)
    p = singular / singular.sum().clamp_min(1e-12) + 1e-12
    return torch.exp(-(p * p.log()).sum())


class CollapseMonitor:
    """Per-dimension std and effective rank of each named feature tensor (e.g. a method's ``pred`` and ``target``),
    with a warning when a std falls under ``std_ratio`` of its first value or a rank drops by more than
    ``rank_drop`` of its first value. A condition is reported when it starts and, with a note, when it ends — not
    at every update while it lasts (a long run would print the same line every log step).

    ``update({'pred': (…, D), 'target': (…, D)})`` -> ({'collapse/pred_std': ..., ...}, [warning strings]).
    """

    def __init__(self, std_ratio: float = 0.1, rank_drop: float = 0.3):
        self.std_ratio, self.rank_drop = std_ratio, rank_drop
        self.reference: dict[str, float] = {}
        self.alarmed: set[str] = set()  # keys whose condition was reported and still holds

    def state_dict(self) -> dict:
        return dict(self.reference)

    def load_state_dict(self, state: dict) -> None:
        self.reference = dict(state)

    def update(self, features_by_name: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
        stats = {}
        for name, features in features_by_name.items():
            flat = features.detach().float().reshape(-1, features.shape[-1])
            stats[f"collapse/{name}_std"] = flat.std(0).mean().item()
            stats[f"collapse/{name}_rank"] = effective_rank(flat).item()
        warnings = []
        for key, value in stats.items():
            first = self.reference.setdefault(key, value)
            message = None
            if key.endswith("_std") and value < self.std_ratio * first:
                message = f"{key} fell to {value:.4g}, under {self.std_ratio} x its first value {first:.4g}"
            if key.endswith("_rank") and value < (1 - self.rank_drop) * first:
                message = f"{key} dropped to {value:.1f} from {first:.1f} (more than {self.rank_drop:.0%})"
            if message is not None and key not in self.alarmed:
                warnings.append(message + " (reported once while it lasts)")
                self.alarmed.add(key)
            elif message is None and key in self.alarmed:
                warnings.append(f"{key} is back to {value:.4g} (first value {first:.4g}): the condition has ended")
                self.alarmed.discard(key)
        return stats, warnings
