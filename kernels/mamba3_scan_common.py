"""Shared ``@triton.jit`` helpers of the Mamba-3 scan kernels (``mamba3_scan_fwd.py``, ``mamba3_scan_bwd.py``).

Conventions are those of ``kernels/mamba3_scan.py`` (the op, its algorithm and its inputs) and of the reference
``kernels/mamba3_scan_ref.py``: state dimensions in the kernels' order (``_state_order``), pairs (2j, 2j + 1) rotated
by angle j, per-head scalars (B, H, L) in each head's scan order.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests) computes bf16 dots wrongly (triton 3.8); there the
# operands, already rounded to their dtype, are multiplied in fp32, which is what the GPU's bf16 dot does.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; ``PRECISION`` is tl.dot's input_precision for fp32 operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cos_sin(phi, FAST: tl.constexpr):
    """cos, sin of fp32 angles of any size. FAST (GPU): reduce to [-π, π] and use the hardware approximations
    (abs. error ~1e-6 there; the reduction's error is that of φ's own fp32 rounding), ~10x cheaper than libdevice."""
    if FAST:
        turns = tl.floor(phi * 0.15915494309189535 + 0.5)
        r = (phi - turns * 6.2831854820251465) + turns * 1.7484555314695172e-07  # 2π = 6.2831854820251465 - 1.75e-7
        cos = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1)
        sin = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1)
        return cos, sin
    else:
        return tl.cos(phi), tl.sin(phi)


@triton.jit
def _block_tile(PTR, pid_bh, pid_block, NUM_BLOCKS, N: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr,
                S: tl.constexpr, ROTATE: tl.constexpr):
    """The chunk-walk prologue of the forward, dC and dB/dx kernels: token, state and head-dim offsets, the state
    order, the chunk diagonal, and this program's (N, P) block tile of ``PTR`` (B, H, NUM_BLOCKS, N, P)."""
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, N)
    offs_p = tl.arange(0, P)
    diagonal = offs_t[:, None] == offs_t[None, :]
    tile = tl.load(PTR + (pid_bh * NUM_BLOCKS + pid_block) * (N * P) + offs_n[:, None] * P + offs_p[None, :])
    return offs_t, offs_n, _state_order(N, S, ROTATE), offs_p, diagonal, tile


@triton.jit
def _state_order(N: tl.constexpr, S: tl.constexpr, ROTATE: tl.constexpr):
    """(N,) memory index of each state dimension in the kernels' order. With rotation (S = N / 4), the kernels'
    pair p holds the stored pair p / 2 (rotated by angle p / 2) for even p and pair S + p // 2 (not rotated) for odd
    p, so that cos/sin are computed for the S rotated pairs only. Dot products do not depend on the order."""
    m = tl.arange(0, N)
    if ROTATE:
        pair = m // 2
        stored_pair = tl.where(pair % 2 == 0, pair // 2, S + pair // 2)
        return 2 * stored_pair + m % 2
    else:
        return m


@triton.jit
def _rotate(v, cos, sin, CHUNK: tl.constexpr, N: tl.constexpr):
    """Rotate the pairs (2p, 2p+1) of v (CHUNK, N) fp32 by the angles whose cos, sin are (CHUNK, N // 2)."""
    even, odd = tl.split(tl.reshape(v, (CHUNK, N // 2, 2)))
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (CHUNK, N))


@triton.jit
def _unrotate(dr, r, cos, sin, CHUNK: tl.constexpr, N: tl.constexpr):
    """Gradient through ``r = rotate(v, φ)``: dr (CHUNK, N) fp32 -> (dv (CHUNK, N), dφ (CHUNK, N // 4)) (the pairs
    that rotate: even pairs in the kernels' order)."""
    d_even, d_odd = tl.split(tl.reshape(dr, (CHUNK, N // 2, 2)))
    r_even, r_odd = tl.split(tl.reshape(r, (CHUNK, N // 2, 2)))
    dphi_pairs = d_odd * r_even - d_even * r_odd
    dv = tl.reshape(tl.join(d_even * cos + d_odd * sin, d_odd * cos - d_even * sin), (CHUNK, N))
    dphi, _ = tl.split(tl.reshape(dphi_pairs, (CHUNK, N // 4, 2)))
    return dv, dphi


@triton.jit
def _load_key(PTR, rows, BIAS, bias_base, mem_n, cos, sin,
              HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr, CHUNK: tl.constexpr, N: tl.constexpr):
    """B̄ or C̄ of one chunk (CHUNK, N) fp32, state dimensions in the kernels' order: the stored per-group vectors at
    element offsets ``rows`` (CHUNK,), plus the per-head bias, rotated."""
    v = tl.load(PTR + rows[:, None] + mem_n[None, :]).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(BIAS + bias_base + mem_n)[None, :]
    if ROTATE:
        v = _rotate(v, cos, sin, CHUNK, N)
    return v


@triton.jit
def _program_ids(H: tl.constexpr, G: tl.constexpr, H_FWD, BATCH_PER_BIAS, L, NUM_CHUNKS, S: tl.constexpr,
                 N: tl.constexpr):
    """-> (block, batch*head, batch, head, group, right-to-left?, base offsets of the (B, H, L) scalars, of the
    per-head bias row, of θ (B, L, S), of the start angles (B, H, NUM_CHUNKS, S))."""
    pid_block = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // H
    head = pid_bh % H
    group = head // (H // G)
    bias_base = ((batch // BATCH_PER_BIAS) * H + head) * N
    return (pid_block, pid_bh, batch, head, group, head >= H_FWD, pid_bh * L, bias_base, batch * L * S,
            pid_bh * NUM_CHUNKS * S)


@triton.jit
def _chunk_inputs(ALOG, W, GD, DT, PT, PHI0, chunk, L, rev, scalar_base, pt_base, phi0_base,
                  S: tl.constexpr, CHUNK: tl.constexpr, ROTATE: tl.constexpr, FAST: tl.constexpr):
    """The per-chunk prologue every kernel shares.

    -> t (CHUNK,) positions in the program's scan order, m (CHUNK,) their memory rows (right-to-left heads: row
    L - 1 - t), w, g (CHUNK,) trapezoid weights, cs (CHUNK,) cumulative log-decay and its total, and with rotation
    the tables cos, sin (CHUNK, 2 S) of φ_t = φ0[chunk] + Σ_{chunk start <= r <= t} Δ_r π tanh(θ_r) (pair 2j of the
    kernels' order rotates by angle j, pair 2j + 1 not at all), Δ (CHUNK,) and π·tanh(θ) (CHUNK, S).
    """
    t = chunk * CHUNK + tl.arange(0, CHUNK)
    m = tl.where(rev, L - 1 - t, t)
    a_log = tl.load(ALOG + scalar_base + t)
    w = tl.load(W + scalar_base + t)
    g = tl.load(GD + scalar_base + t)
    cs = tl.cumsum(a_log, axis=0)
    total = tl.sum(a_log, axis=0)
    if ROTATE:
        offs_j = tl.arange(0, S)
        dt = tl.load(DT + scalar_base + t)
        pt = tl.load(PT + pt_base + m[:, None] * S + offs_j[None, :])
        phi = tl.load(PHI0 + phi0_base + chunk * S + offs_j)[None, :] + tl.cumsum(dt[:, None] * pt, axis=0)
        cos, sin = _cos_sin(phi, FAST)
        cos = tl.reshape(tl.join(cos, tl.full((CHUNK, S), 1.0, tl.float32)), (CHUNK, 2 * S))
        sin = tl.reshape(tl.join(sin, tl.zeros((CHUNK, S), tl.float32)), (CHUNK, 2 * S))
    else:
        cos = 0.0
        sin = 0.0
        dt = 0.0
        pt = 0.0
    return t, m, w, g, cs, total, cos, sin, dt, pt


@triton.jit
def _tile_angles(DT, PT, PHI0, batch, head, rev, m, valid, L, NUM_CHUNKS, H: tl.constexpr, S: tl.constexpr,
                 CHUNK: tl.constexpr, ROWS: tl.constexpr, FAST: tl.constexpr):
    """Angles of one head over a tile of ROWS memory rows ``m`` (a whole number of chunks; ``valid`` masks rows past
    the end).

    φ_t = φ0[first chunk of the tile in the head's scan order] + the tile's cumulative Σ Δ π tanh θ up to t in scan
    order (right-to-left heads scan the tile from its last row); this equals the per-chunk form because φ0 holds
    the exclusive cumulative sums of whole chunks. -> (cos, sin (ROWS, S), Δ (ROWS,), π tanh θ (ROWS, S), scan
    positions t (ROWS,), index of the base chunk)."""
    offs_j = tl.arange(0, S)
    t = tl.where(rev, L - 1 - m, m)
    dt = tl.load(DT + (batch * H + head) * L + t, mask=valid, other=0.0)
    pt = tl.load(PT + (batch * L + m)[:, None] * S + offs_j[None, :], mask=valid[:, None], other=0.0)
    step = dt[:, None] * pt
    forward_sum = tl.cumsum(step, axis=0)
    within = tl.where(rev, tl.sum(step, axis=0)[None, :] - forward_sum + step, forward_sum)
    first_row = tl.min(m, axis=0)
    last_row = tl.minimum(first_row + ROWS, L) - 1
    base_chunk = tl.where(rev, L - 1 - last_row, first_row) // CHUNK
    phi = tl.load(PHI0 + ((batch * H + head) * NUM_CHUNKS + base_chunk) * S + offs_j)[None, :] + within
    cos, sin = _cos_sin(phi, FAST)
    return cos, sin, dt, pt, t, base_chunk


@triton.jit
def _load_pairs(PTR, rows, valid, S: tl.constexpr, ROWS: tl.constexpr):
    """The rotated half (dims < 2 S) of ROWS keys as its pair members: (ROWS, S) first (dims 2j), (ROWS, S) second
    (dims 2j + 1), fp32; one contiguous load."""
    cols = tl.arange(0, 2 * S)
    v = tl.load(PTR + rows[:, None] + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    return tl.split(tl.reshape(v, (ROWS, S, 2)))


@triton.jit
def _store_pairs(PTR, rows, valid, a, b, S: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.arange(0, 2 * S)
    v = tl.reshape(tl.join(a, b), (ROWS, 2 * S))
    tl.store(PTR + rows[:, None] + cols[None, :], v.to(PTR.dtype.element_ty), mask=valid[:, None])
