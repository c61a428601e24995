"""Stateful per-optimizer-step schedules that reach their configured end value at ``total_steps`` (host-side, saved
with the trainer's state), and ``LinearRampWeight``: a loss weight a method ramps on the device itself (saved with
the model)."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn as nn


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


class LinearRampWeight(nn.Module):
    """A loss weight that ramps with the optimizer step, kept by the method that uses it (the trainer knows nothing
    of it): forward() -> 0-d fp32 tensor

        w(s) = final * clamp((s - start) / warmup, 0, 1)      (warmup 0: 0 before ``start``, ``final`` from it)

    at ``s`` = optimizer steps done = training calls so far // ``calls_per_step`` (a method's forward runs
    ``trainer.grad_accum_steps`` times per optimizer step). 0 until ``start``, linear to ``final`` over ``warmup``
    steps, then held (V-JEPA 2.1's context-loss warm-up). Each call in training mode advances the ``calls`` buffer,
    part of the model's state dict: a checkpoint restores it and a resumed run continues the ramp exactly. Computed
    on the device from the buffer: nothing is read back to the host.
    """

    def __init__(self, final: float, warmup: int = 0, start: int = 0, calls_per_step: int = 1):
        super().__init__()
        if final < 0 or warmup < 0 or start < 0 or calls_per_step < 1:
            raise ValueError(f"LinearRampWeight: final {final}, warmup {warmup}, start {start} must be >= 0 and "
                             f"calls_per_step {calls_per_step} >= 1")
        self.final, self.warmup, self.start = float(final), int(warmup), int(start)
        self.calls_per_step = int(calls_per_step)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def at(self, step: int) -> float:
        """The closed-form weight at optimizer step ``step`` (host-side, for logs and tests)."""
        if self.warmup == 0:
            return self.final if step >= self.start else 0.0
        return self.final * min(max((step - self.start) / self.warmup, 0.0), 1.0)

    def forward(self) -> torch.Tensor:
        step = torch.div(self.calls, self.calls_per_step, rounding_mode="floor")
        if self.warmup == 0:
            fraction = (step >= self.start).float()
        else:
            fraction = ((step - self.start).float() / self.warmup).clamp(0.0, 1.0)
        if self.training:
            self.calls.add_(1)
        return fraction * self.final

    def extra_repr(self) -> str:
        return f"final={self.final}, warmup={self.warmup}, start={self.start}, calls_per_step={self.calls_per_step}"
