import math

import torch
import torch.nn as nn

from jepa.ema import ema_update
from jepa.schedules import Cosine, Linear, WarmupCosine


def run(schedule, steps):
    values = []
    for _ in range(steps + 1):
        values.append(schedule.value())
        schedule.step()
    return values


def test_warmup_cosine_closed_form_and_end():
    s = WarmupCosine(start=2e-4, peak=1e-3, final=1e-6, warmup=10, total_steps=100)
    values = run(s, 100)
    for t in range(0, 10):
        assert math.isclose(values[t], 2e-4 + (1e-3 - 2e-4) * t / 10)
    for t in range(10, 101):
        expected = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))
        assert math.isclose(values[t], expected, rel_tol=1e-12)
    assert math.isclose(values[10], 1e-3) and math.isclose(values[100], 1e-6)
    assert s.value() == 1e-6  # stays at the end past the horizon


def test_cosine_wd_and_linear_momentum_reach_their_end():
    wd = run(Cosine(0.04, 0.4, 50), 50)
    mom = run(Linear(0.996, 1.0, 50), 50)
    for t in range(51):
        assert math.isclose(wd[t], 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * t / 50)))
        assert math.isclose(mom[t], 0.996 + 0.004 * t / 50)
    assert math.isclose(wd[0], 0.04) and math.isclose(wd[-1], 0.4)
    assert math.isclose(mom[-1], 1.0)


def test_schedule_state_roundtrip():
    a = WarmupCosine(0, 1, 0, 5, 20)
    for _ in range(7):
        a.step()
    b = WarmupCosine(0, 1, 0, 5, 20)
    b.load_state_dict(a.state_dict())
    assert b.value() == a.value() and b.current == 7


def test_ema_closed_form():
    torch.manual_seed(0)
    online, target = nn.Linear(4, 3), nn.Linear(4, 3)
    online.register_buffer("count", torch.tensor(5.0))
    target.register_buffer("count", torch.tensor(0.0))
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t0, t1, o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * o, rtol=0, atol=1e-7)
    assert target.count.item() == 5.0
    ema_update(target, online, 1.0)  # momentum 1: frozen
    ema_update(target, online, 0.0)  # momentum 0: copy
    for t1, o in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(t1, o, rtol=0, atol=0)
