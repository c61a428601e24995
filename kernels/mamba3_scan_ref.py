"""Mamba-3 scan in plain PyTorch: the step recurrence, the chunked quadratic form, and the rotation helpers.

Notation (per batch row ``b`` and head ``h``; ``t`` and ``s`` index tokens):

* ``Δ_t = dt``, ``A_t = A`` (negative), ``λ_t = lam`` in [0, 1];
* ``a_t = exp(Δ_t A_t)``, ``g_t = λ_t Δ_t``, ``b_t = (1 - λ_t) Δ_t a_t``;
* generalized exponential-trapezoidal recurrence (Mamba-3)::

      h_t = a_t h_{t-1} + b_t B̄_{t-1} x_{t-1}ᵀ + g_t B̄_t x_tᵀ,        y_t = h_tᵀ C̄_t + D x_t

* the same map as one lower-triangular matrix (the quadratic form)::

      y_t = Σ_{s<t} (C̄_t·B̄_s) exp(Σ_{r=s+1..t} Δ_r A_r) w_s x_s + g_t (C̄_t·B̄_t) x_t + D x_t,
      w_s = g_s + (1 - λ_{s+1}) Δ_{s+1}          (Δ_{L} = 0 past the last token)

Rotation ("RoPE trick" for the complex state): ``B̄_t = R(φ_t) B_t`` and ``C̄_t = R(φ_t) C_t`` with cumulative,
data-dependent, per-head angles ``φ_t = φ_{t-1} + Δ_t · π · tanh(θ_t)``. Convention: angle ``i`` rotates the adjacent
pair of state dimensions ``(2i, 2i+1)`` for ``i < S``; with ``S = N // 4`` angles, the first half of the state is
rotated and the second half is left real. The step form instead keeps ``B`` and ``C`` unrotated and rotates the
state by ``-Δ_t π tanh(θ_t)`` at every step; both forms give the same ``y``.

MIMO with rank ``R``: ``B``, ``C`` and ``x`` carry a rank axis, the state is shared by the ranks
(``h_t`` receives ``Σ_r B̄_{r,t} x_{r,t}ᵀ``) and every rank reads it out (``y_{r,t} = h_tᵀ C̄_{r,t}``).

Everything here is differentiable by autograd and exact in float64 (the tests compare step and chunked forms to 1e-10).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def trapezoid_weights(dt: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dt, lam (B, L, H) -> (g, w), both (B, L, H).

    ``g_t = λ_t Δ_t`` weighs a token's own contribution to its output; ``w_s = g_s + (1 - λ_{s+1}) Δ_{s+1}`` weighs its
    contribution to every later token (the trapezoid's two ends; ``Δ`` past the last token is 0).
    """
    g = lam * dt
    next_end = F.pad(((1 - lam) * dt)[:, 1:], (0, 0, 0, 1))
    return g, g + next_end


def cumulative_angles(dt: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """dt (B, L, H), theta (B, L, S) -> φ (B, L, H, S) = cumsum_t(Δ_t · π · tanh(θ_t)) along L (float32 or wider)."""
    dtype = torch.promote_types(dt.dtype, torch.float32)
    step = dt.to(dtype).transpose(1, 2)[..., None] * (math.pi * torch.tanh(theta.to(dtype)))[:, None, :, :]
    return torch.cumsum(step, dim=2).transpose(1, 2)  # the scan runs along the innermost-but-one axis: (B, H, L, S)


def rotate_pairs(v: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs ``(2i, 2i+1)``, ``i < S``, of the last axis of ``v`` by ``angle[..., i]``.

    v (..., N), angle (..., S) broadcastable to v's leading axes, ``2 S <= N`` -> (..., N). Dimensions past ``2 S`` pass.
    """
    num_angles = angle.shape[-1]
    rotated, passed = v[..., : 2 * num_angles], v[..., 2 * num_angles :]
    pairs = rotated.unflatten(-1, (num_angles, 2))
    first, second = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(angle).to(v.dtype), torch.sin(angle).to(v.dtype)
    out = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1).flatten(-2)
    return torch.cat((out, passed), dim=-1)


def expand_groups(v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, G, ...) -> (B, L, H, ...): head ``h`` uses group ``h // (H // G)``."""
    groups = v.shape[2]
    if num_heads % groups:
        raise ValueError(f"num_heads {num_heads} is not a multiple of the number of B/C groups {groups}")
    return v.repeat_interleave(num_heads // groups, dim=2) if groups != num_heads else v


def scan_step_ref(x, dt, A, lam, Bm, Cm, D=None, theta=None):
    """The literal recurrence, one token at a time (slow; for tests).

    x (B, L, H, P) or (B, L, H, R, P) for MIMO; dt, A, lam (B, L, H); Bm, Cm (B, L, G, N) or (B, L, G, R, N), *unrotated*;
    D (H) or None; theta (B, L, S) rotation inputs or None (no rotation). Returns y shaped like x.
    The state rotates by ``-Δ_t π tanh(θ_t)`` each step (equivalent to rotating B and C by the cumulative angle).
    """
    siso = x.dim() == 4
    if siso:
        x, Bm, Cm = x.unsqueeze(3), Bm.unsqueeze(3), Cm.unsqueeze(3)
    batch, length, heads, ranks, headdim = x.shape
    Bh, Ch = expand_groups(Bm, heads), expand_groups(Cm, heads)  # (B, L, H, R, N)
    state = x.new_zeros(batch, heads, Bh.shape[-1], headdim)
    prev_bx = torch.zeros_like(state)  # Σ_r B_{r,t-1} x_{r,t-1}ᵀ
    outputs = []
    for t in range(length):
        bx = torch.einsum("bhrn,bhrp->bhnp", Bh[:, t], x[:, t])
        decay = torch.exp(dt[:, t] * A[:, t])[..., None, None]
        if theta is not None:
            step_angle = -dt[:, t, :, None] * math.pi * torch.tanh(theta[:, t, None, :])  # (B, H, S)
            state = rotate_pairs(state.transpose(-1, -2), step_angle[:, :, None]).transpose(-1, -2)
            prev_bx = rotate_pairs(prev_bx.transpose(-1, -2), step_angle[:, :, None]).transpose(-1, -2)
        begin_weight = ((1 - lam[:, t]) * dt[:, t])[..., None, None] * decay
        end_weight = (lam[:, t] * dt[:, t])[..., None, None]
        state = decay * state + begin_weight * prev_bx + end_weight * bx
        prev_bx = bx
        outputs.append(torch.einsum("bhnp,bhrn->bhrp", state, Ch[:, t]))
    y = torch.stack(outputs, dim=1)
    if D is not None:
        y = y + D[:, None, None] * x
    return y.squeeze(3) if siso else y


def scan_chunked_ref(x, dt, A, lam, Bm, Cm, D=None, chunk_size: int = 64):
    """Chunked quadratic form (SISO or MIMO), the reference for the Triton kernel.

    x (B, L, H, P) or (B, L, H, R, P); dt, A, lam (B, L, H); Bm, Cm (B, L, G, N) or (B, L, G, R, N), *already rotated*
    (``B̄``, ``C̄``; for per-head rotation or biases pass G = H); D (H) or None. Returns y shaped like x.
    Within a chunk the full lower-triangular weight matrix is formed; chunks pass an (N, P) state per head.
    """
    siso = x.dim() == 4
    if siso:
        x, Bm, Cm = x.unsqueeze(3), Bm.unsqueeze(3), Cm.unsqueeze(3)
    batch, length, heads, ranks, headdim = x.shape
    Bh, Ch = expand_groups(Bm, heads), expand_groups(Cm, heads)
    g, w = trapezoid_weights(dt, lam)
    a_log = dt * A
    pad = (-length) % chunk_size
    if pad:
        x, Bh, Ch = (F.pad(v, (0, 0, 0, 0, 0, 0, 0, pad)) for v in (x, Bh, Ch))
        g, w, a_log = (F.pad(v, (0, 0, 0, pad)) for v in (g, w, a_log))
    chunks = (length + pad) // chunk_size

    def split(v):
        return v.unflatten(1, (chunks, chunk_size))

    xc, Bc, Cc, gc, wc, ac = map(split, (x, Bh, Ch, g, w, a_log))
    cs = torch.cumsum(ac, dim=2)  # (B, C, Q, H), within-chunk cumulative log-decay
    diff = (cs[:, :, :, None, :] - cs[:, :, None, :, :]).permute(0, 1, 4, 2, 3)  # (B, C, H, Qt, Qs)
    idx = torch.arange(chunk_size, device=x.device)
    below = idx[:, None] > idx[None, :]
    diagonal = idx[:, None] == idx[None, :]
    weight = torch.where(below, torch.exp(diff.clamp(max=0)) * wc.permute(0, 1, 3, 2)[:, :, :, None, :], 0.0)
    weight = weight + torch.where(diagonal, gc.permute(0, 1, 3, 2)[..., None], 0.0)
    scores = torch.einsum("bcthun,bcshrn->bchtusr", Cc, Bc)  # C̄_{u,t} · B̄_{r,s}
    y = torch.einsum("bchtusr,bchts,bcshrp->bcthup", scores, weight, xc)

    to_end = torch.exp(cs[:, :, -1:, :] - cs) * wc  # (B, C, Q, H)
    chunk_states = torch.einsum("bcshrn,bcsh,bcshrp->bchnp", Bc, to_end, xc)
    chunk_decay = torch.exp(cs[:, :, -1, :])  # (B, C, H)
    state = x.new_zeros(batch, heads, Bh.shape[-1], headdim)
    incoming = []
    for c in range(chunks):
        incoming.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_states[:, c]
    incoming = torch.stack(incoming, dim=1)  # (B, C, H, N, P)
    y = y + torch.einsum("bcthun,bchnp,bcth->bcthup", Cc, incoming, torch.exp(cs))
    y = y.flatten(1, 2)[:, :length]
    if D is not None:
        y = y + D[:, None, None] * x[:, :length]
    return y.squeeze(3) if siso else y


def bias_and_rotate_groups(v: torch.Tensor, bias: torch.Tensor | None, angle: torch.Tensor | None) -> torch.Tensor:
    """v per group (B, L, G, N), or (B, L, G, R, N) with a MIMO rank axis -> per head (B, L, H, N) or
    (B, L, H, R, N): ``R(angle) (v + bias)``, in float32 or wider.

    bias (NB, H, N) or (NB, H, R, N) (batch row b uses row b // (B / NB)) or None; angle (B, L, H, S), with a rank
    axis (B, L, H, 1, S) (the same for every rank), or None.
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    if bias is None:
        heads = v.shape[2] if angle is None else angle.shape[2]
        return rotate_pairs(expand_groups(v.to(dtype), heads), angle) if angle is not None else v.to(dtype)
    per_head = expand_groups(v.to(dtype), bias.shape[1])
    per_head = per_head + bias.to(dtype).repeat_interleave(v.shape[0] // bias.shape[0], dim=0)[:, None]
    return per_head if angle is None else rotate_pairs(per_head, angle)


def scan_fused_ref(x, dt, A, lam, Bm, Cm, D=None, B_bias=None, C_bias=None, theta=None, chunk_size: int = 64,
                   reversed_heads: int = 0):
    """The reference of the fused Triton op (``mamba3_scan`` with biases and θ) and the Mamba-3 layer's PyTorch path:
    per-group Bm, Cm get per-head biases and the cumulative rotation, then the chunked scan.

    SISO: x (B, L, H, P), Bm, Cm (B, L, G, N), B_bias, C_bias (H, N) or (NB, H, N); MIMO: x (B, L, H, R, P), Bm, Cm
    (B, L, G, R, N), biases (H, R, N) or (NB, H, R, N) (batch row b uses row b // (B / NB)); dt, A, lam (B, L, H);
    theta (B, L, S) or None; D (H) or None. The last ``reversed_heads`` heads scan right to left: they are this
    function run on the flipped sequence, flipped back. B̄, C̄ are formed in float32 or wider and cast to x's dtype;
    the scan runs in x's dtype (pass float64 inputs for a ground truth). Returns y shaped like x, differentiable in
    everything."""
    heads = x.shape[2]
    if B_bias is not None and B_bias.dim() == Bm.dim() - 2:
        B_bias, C_bias = B_bias[None], C_bias[None]
    if reversed_heads:
        fwd = heads - reversed_heads
        Bh, Ch = expand_groups(Bm, heads), expand_groups(Cm, heads)

        def part(sl, flip):
            def cut(v, axis=2):
                v = v.narrow(axis, sl.start, sl.stop - sl.start)
                return v.flip(1) if flip and axis == 2 else v
            y = scan_fused_ref(cut(x), cut(dt), cut(A), cut(lam), cut(Bh), cut(Ch),
                               None if D is None else D[sl], None if B_bias is None else cut(B_bias, 1),
                               None if C_bias is None else cut(C_bias, 1),
                               None if theta is None else (theta.flip(1) if flip else theta), chunk_size)
            return y.flip(1) if flip else y

        parts = [part(slice(0, fwd), False)] if fwd else []
        return torch.cat(parts + [part(slice(fwd, heads), True)], dim=2)
    angle = None if theta is None else cumulative_angles(dt, theta)
    if angle is not None and Bm.dim() == 5:
        angle = angle[:, :, :, None, :]  # every rank rotates by its head's angle
    Bh = bias_and_rotate_groups(Bm, B_bias, angle).to(x.dtype)
    Ch = bias_and_rotate_groups(Cm, C_bias, angle).to(x.dtype)
    return scan_chunked_ref(x, dt, A, lam, Bh, Ch, D, chunk_size=chunk_size)
