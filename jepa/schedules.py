"""Stateful per-optimizer-step schedules that reach their configured end value at ``total_steps``."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod


class Schedule(ABC):
    """Call ``value()`` for the current step's value, ``step()`` after each optimizer step."""

    def __init__(self, total_steps: int):
        if total_steps <= 0:
            raise ValueError(f"schedule total_steps must be > 0, got {total_steps}")
        self.total_steps = total_steps
        self.current = 0

    @abstractmethod
    def at(self, step: int) -> float:
        """The closed-form value at ``step`` (0 <= step <= total_steps)."""

    def value(self) -> float:
        return self.at(min(self.current, self.total_steps))

    def step(self) -> None:
        self.current += 1

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = int(state["current"])


class WarmupCosine(Schedule):
    """Linear ``start -> peak`` over ``warmup`` steps, then cosine ``peak -> final`` at ``total_steps``."""

    def __init__(self, start: float, peak: float, final: float, warmup: int, total_steps: int):
        super().__init__(total_steps)
        self.start, self.peak, self.final, self.warmup = start, peak, final, min(warmup, total_steps)

    def at(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (self.peak - self.start) * step / self.warmup
        span = self.total_steps - self.warmup
        progress = 1.0 if span == 0 else (step - self.warmup) / span
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Cosine(Schedule):
    """Cosine ``start -> final`` over ``total_steps`` (weight decay rises 0.04 -> 0.4 in I-JEPA)."""

    def __init__(self, start: float, final: float, total_steps: int):
        super().__init__(total_steps)
        self.start, self.final = start, final

    def at(self, step: int) -> float:
        return self.final + (self.start - self.final) * 0.5 * (1.0 + math.cos(math.pi * step / self.total_steps))


class Linear(Schedule):
    """Linear ``start -> final`` over ``total_steps`` (EMA momentum 0.996 -> 1.0)."""

    def __init__(self, start: float, final: float, total_steps: int):
        super().__init__(total_steps)
        self.start, self.final = start, final

    def at(self, step: int) -> float:
        return self.start + (self.final - self.start) * step / self.total_steps
