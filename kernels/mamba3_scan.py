"""Mamba-3 scan in Triton: chunk-parallel forward and backward (reference: ``kernels/mamba3_scan_ref.py``).

Public op::

    mamba3_scan(x (B, L, H, P), dt (B, L, H), A (B, L, H), lam (B, L, H),
                Bm (B, L, G, N), Cm (B, L, G, N), D (H) | None, chunk_size=32,
                *, B_bias=None, C_bias=None, theta=None) -> y (B, L, H, P)

Plain form: ``Bm`` and ``Cm`` are ``B̄`` and ``C̄``, already biased and rotated (pass G = H when they are per head).
Fused form (what the layer uses): ``Bm``, ``Cm`` stay per group and unrotated, with per-head biases ``B_bias``,
``C_bias`` (H, N) or (NB, H, N) and rotation inputs ``theta`` (B, L, N / 4): ``B̄_t = R(φ_t) (B_t + bias_h)`` with
the cumulative angle ``φ_t = Σ_{r<=t} Δ_r π tanh(θ_r)`` (per head; angle j rotates the pair (2j, 2j + 1), the second
half of the state is real). φ is each chunk's starting angle (a small (B, H, L / CHUNK, S) tensor from a per-chunk
einsum and cumsum) plus an in-kernel cumulative sum; cos/sin use the hardware approximations after reduction to
[-π, π] (libdevice under the interpreter).

By default B̄, C̄ are formed in one parallel pass before the scan (``_rotate_keys_kernel``, per-head bf16 copies) and
the scan kernels run the plain form; the gradient pass (``_key_grads_kernel``) takes dB̄, dC̄ back through the
rotation, sums them over each group's heads, and gives the angle and bias gradients. ``inline_rotation=True``
instead builds B̄, C̄ inside every scan kernel's chunk loop (the state dimensions in a permuted order,
``_state_order``, so that cos/sin are computed for the N / 4 angles only); it is about 2x slower on an H100, since
the rotation then sits in the sequential loops (BENCHMARKS.md). Holding the pair members and the real half as three
separate tiles inside the scan kernels was measured slower still (three times the small dots) and dropped.
``dt`` is Δ (softplus done, 0 at padding), ``A`` is negative, ``lam`` is λ in [0, 1]. x, Bm and Cm share a
dtype (bf16 or fp32); the state, the angles and every accumulation are fp32. Differentiable in all inputs.
``D`` (the skip ``D x``) is fused into the forward and dx kernels. ``reversed_heads``: the last heads scan right to
left in the same launch (each program maps its scan position t to memory row L - 1 - t), which is how the
bidirectional layer runs both directions without flipping or concatenating anything.

Algorithm. The op is the quadratic form ``y_t = Σ_{s<t} (C̄_t·B̄_s) e^{cs_t - cs_s} w_s x_s + g_t (C̄_t·B̄_t) x_t``
with ``cs`` the cumulative ``Δ A``, ``g = λΔ`` and ``w_s = g_s + (1 - λ_{s+1}) Δ_{s+1}`` (see the reference). The
sequence is cut into chunks of ``chunk_size`` tokens and the chunks into *blocks* of several chunks. One program
handles one (batch, head, block), so a batch of 1 with a long sequence still gives thousands of programs:

1. ``_block_state_kernel``: each block's end state from a zero start, ``Σ_s e^{cs_end - cs_s} w_s B̄_s x_sᵀ`` (N, P);
2. ``_block_scan_kernel``: a short sequential scan over blocks turns those into each block's incoming state;
3. ``_chunk_forward_kernel``: each block walks its chunks: intra-chunk quadratic form plus ``C̄_t`` times the state.

Backward runs the same structure: the reverse state ``Σ_{t>end} e^{cs_t - cs_end} C̄_t dy_tᵀ`` per block (kernels 1
and 2 in reverse), ``_chunk_dq_kernel`` (forward walk from the saved incoming states) and ``_chunk_dkdx_kernel``
(backward walk; by default two launches, the dB side and the x side, each with fewer live tiles). The chunk loops are
software-pipelined (``num_stages``). The gradient of the log-decay comes out as ``d cs_t = C̄_t·dC̄_t^{off} - w_t dw_t`` followed by a
reverse cumulative sum along the sequence.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
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
def _block_state_kernel(
    U, V, ALOG, W, STATE, BLOCK_DECAY, UBIAS, DT, PT, PHI0,
    L, H: tl.constexpr, G: tl.constexpr, H_FWD, NUM_CHUNKS, CHUNKS_PER_BLOCK, NUM_BLOCKS,
    N: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BATCH_PER_BIAS, S: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr,
    FAST: tl.constexpr, STAGES: tl.constexpr,
):
    """Per (block, batch*head): forward: Σ_s e^{cs_end - cs_s} w_s u_s v_sᵀ; reverse: Σ_t e^{cs_t - cs_start-1} u_t v_tᵀ.

    U (B, L, G, N), V (B, L, H, P), ALOG/W (B, H, L) fp32 -> STATE (B, H, NUM_BLOCKS, N, P) fp32, BLOCK_DECAY
    (B, H, NUM_BLOCKS) fp32 (the block's total log-decay).
    """
    pid_block, pid_bh, batch, head, group, rev, scalar_base, bias_base, pt_base, phi0_base = _program_ids(
        H, G, H_FWD, BATCH_PER_BIAS, L, NUM_CHUNKS, S, N)
    offs_n = tl.arange(0, N)
    mem_n = _state_order(N, S, ROTATE)
    offs_p = tl.arange(0, P)
    acc = tl.zeros((N, P), dtype=tl.float32)
    total = tl.sum(tl.zeros((CHUNK,), dtype=tl.float32), axis=0)
    first = pid_block * CHUNKS_PER_BLOCK
    last = tl.minimum(first + CHUNKS_PER_BLOCK, NUM_CHUNKS)
    for chunk in tl.range(first, last, num_stages=STAGES):
        t, m, w, g, cs, chunk_total, cos, sin, dt, pt = _chunk_inputs(
            ALOG, W, W, DT, PT, PHI0, chunk, L, rev, scalar_base, pt_base, phi0_base, S, CHUNK, ROTATE, FAST)
        u = _load_key(U, (batch * L + m) * (G * N) + group * N, UBIAS, bias_base, mem_n, cos, sin, HAS_BIAS, ROTATE,
                      CHUNK, N)
        v = tl.load(V + ((batch * L + m) * H + head)[:, None] * P + offs_p[None, :])
        if REVERSE:
            acc += _mm(tl.trans((u * tl.exp(total + cs)[:, None]).to(v.dtype)), v, PRECISION, UPCAST)
        else:
            coef = tl.exp(chunk_total - cs) * w
            acc = acc * tl.exp(chunk_total) + _mm(tl.trans((u * coef[:, None]).to(v.dtype)), v, PRECISION, UPCAST)
        total += chunk_total
    out = STATE + (pid_bh * NUM_BLOCKS + pid_block) * (N * P)
    tl.store(out + offs_n[:, None] * P + offs_p[None, :], acc)
    tl.store(BLOCK_DECAY + pid_bh * NUM_BLOCKS + pid_block, total)


@triton.jit
def _block_scan_kernel(STATE, BLOCK_DECAY, NUM_BLOCKS, SIZE: tl.constexpr, TILE: tl.constexpr, REVERSE: tl.constexpr):
    """In place over STATE (B*H, NUM_BLOCKS, SIZE): block j's local sum becomes the state entering block j.

    Forward: ``in_j = Σ_{i<j} e^{Σ_{i<k<j} A_k} S_i``; reverse: ``in_j = Σ_{i>j} e^{Σ_{j<k<i} A_k} S_i``.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * TILE + tl.arange(0, TILE)
    base = STATE + pid_bh * NUM_BLOCKS * SIZE + offs
    state = tl.zeros((TILE,), dtype=tl.float32)
    for step in tl.range(0, NUM_BLOCKS, num_stages=3):
        if REVERSE:
            block = NUM_BLOCKS - 1 - step
        else:
            block = step
        local = tl.load(base + block * SIZE)
        tl.store(base + block * SIZE, state)
        state = state * tl.exp(tl.load(BLOCK_DECAY + pid_bh * NUM_BLOCKS + block)) + local


@triton.jit
def _chunk_forward_kernel(
    Cq, Bk, X, ALOG, W, GD, STATE_IN, Y, QBIAS, KBIAS, DT, PT, PHI0, DSKIP,
    L, H: tl.constexpr, G: tl.constexpr, H_FWD, NUM_CHUNKS, CHUNKS_PER_BLOCK, NUM_BLOCKS,
    N: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BATCH_PER_BIAS, S: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr, FAST: tl.constexpr,
    HAS_D: tl.constexpr, STAGES: tl.constexpr,
):
    """y for one (block, batch*head): walks the block's chunks from the block's incoming state (+ D x)."""
    pid_block, pid_bh, batch, head, group, rev, scalar_base, bias_base, pt_base, phi0_base = _program_ids(
        H, G, H_FWD, BATCH_PER_BIAS, L, NUM_CHUNKS, S, N)
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, N)
    mem_n = _state_order(N, S, ROTATE)
    offs_p = tl.arange(0, P)
    below = offs_t[:, None] > offs_t[None, :]
    diagonal = offs_t[:, None] == offs_t[None, :]
    state = tl.load(STATE_IN + (pid_bh * NUM_BLOCKS + pid_block) * (N * P) + offs_n[:, None] * P + offs_p[None, :])
    first = pid_block * CHUNKS_PER_BLOCK
    last = tl.minimum(first + CHUNKS_PER_BLOCK, NUM_CHUNKS)
    for chunk in tl.range(first, last, num_stages=STAGES):
        t, m, w, g, cs, chunk_total, cos, sin, dt, pt = _chunk_inputs(
            ALOG, W, GD, DT, PT, PHI0, chunk, L, rev, scalar_base, pt_base, phi0_base, S, CHUNK, ROTATE, FAST)
        key_rows = (batch * L + m) * (G * N) + group * N
        q = _load_key(Cq, key_rows, QBIAS, bias_base, mem_n, cos, sin, HAS_BIAS, ROTATE, CHUNK, N).to(X.dtype.element_ty)
        k = _load_key(Bk, key_rows, KBIAS, bias_base, mem_n, cos, sin, HAS_BIAS, ROTATE, CHUNK, N).to(X.dtype.element_ty)
        xy_offs = ((batch * L + m) * H + head)[:, None] * P + offs_p[None, :]
        x = tl.load(X + xy_offs)
        y = _mm(q, state.to(q.dtype), PRECISION, UPCAST) * tl.exp(cs)[:, None]
        scores = _mm(q, tl.trans(k), PRECISION, UPCAST)
        decay = tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0))
        weight = tl.where(below, decay * w[None, :], tl.where(diagonal, g[:, None], 0.0))
        y += _mm((scores * weight).to(x.dtype), x, PRECISION, UPCAST)
        if HAS_D:
            y += tl.load(DSKIP + head) * x.to(tl.float32)
        tl.store(Y + xy_offs, y.to(Y.dtype.element_ty))
        k_to_end = (k * (tl.exp(chunk_total - cs) * w)[:, None]).to(k.dtype)
        state = state * tl.exp(chunk_total) + _mm(tl.trans(k_to_end), x, PRECISION, UPCAST)


@triton.jit
def _chunk_dq_kernel(
    Cq, Bk, X, DY, ALOG, W, GD, STATE_IN, DQ, QDQ, QBIAS, KBIAS, DT, PT, PHI0, DPHI, DQBIAS,
    L, H: tl.constexpr, G: tl.constexpr, H_FWD, NUM_CHUNKS, CHUNKS_PER_BLOCK, NUM_BLOCKS,
    N: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BATCH_PER_BIAS, S: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr, FAST: tl.constexpr,
    STAGES: tl.constexpr,
):
    """dC per head (B, L, H, N) (unrotated: the gradient of the biased, unrotated C), ``C̄_t·dC̄_t`` without its
    diagonal term (B, H, L, scan order), and with rotation the C side of dφ (B, H, L, S) (memory order); walking
    chunks forward."""
    pid_block, pid_bh, batch, head, group, rev, scalar_base, bias_base, pt_base, phi0_base = _program_ids(
        H, G, H_FWD, BATCH_PER_BIAS, L, NUM_CHUNKS, S, N)
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, N)
    mem_n = _state_order(N, S, ROTATE)
    offs_p = tl.arange(0, P)
    below = offs_t[:, None] > offs_t[None, :]
    diagonal = offs_t[:, None] == offs_t[None, :]
    state = tl.load(STATE_IN + (pid_bh * NUM_BLOCKS + pid_block) * (N * P) + offs_n[:, None] * P + offs_p[None, :])
    bias_grad = tl.zeros((N,), dtype=tl.float32)
    first = pid_block * CHUNKS_PER_BLOCK
    last = tl.minimum(first + CHUNKS_PER_BLOCK, NUM_CHUNKS)
    for chunk in tl.range(first, last, num_stages=STAGES):
        t, m, w, g, cs, chunk_total, cos, sin, dt, pt = _chunk_inputs(
            ALOG, W, GD, DT, PT, PHI0, chunk, L, rev, scalar_base, pt_base, phi0_base, S, CHUNK, ROTATE, FAST)
        key_rows = (batch * L + m) * (G * N) + group * N
        q_wide = _load_key(Cq, key_rows, QBIAS, bias_base, mem_n, cos, sin, HAS_BIAS, ROTATE, CHUNK, N)
        q = q_wide.to(X.dtype.element_ty)
        k = _load_key(Bk, key_rows, KBIAS, bias_base, mem_n, cos, sin, HAS_BIAS, ROTATE, CHUNK, N).to(X.dtype.element_ty)
        xy_offs = ((batch * L + m) * H + head)[:, None] * P + offs_p[None, :]
        x = tl.load(X + xy_offs)
        dy = tl.load(DY + xy_offs)
        dq = _mm(dy, tl.trans(state).to(dy.dtype), PRECISION, UPCAST) * tl.exp(cs)[:, None]
        dy_x = _mm(dy, tl.trans(x), PRECISION, UPCAST)  # [t, s] = dy_t · x_s
        decay = tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0))
        weight = tl.where(below, decay * w[None, :], 0.0)
        dq += _mm((dy_x * weight).to(k.dtype), k, PRECISION, UPCAST)
        q_dq = tl.sum(q.to(tl.float32) * dq, axis=1)
        x_dy = tl.sum(tl.where(diagonal, dy_x, 0.0), axis=1)
        dq += (g * x_dy)[:, None] * k.to(tl.float32)
        if ROTATE:
            dq, dphi = _unrotate(dq, q_wide, cos, sin, CHUNK, N)
            offs_j = tl.arange(0, S)
            tl.store(DPHI + (pid_bh * L + m[:, None]) * S + offs_j[None, :], dphi)
        if HAS_BIAS:
            bias_grad += tl.sum(dq, axis=0)
        tl.store(DQ + ((batch * L + m) * H + head)[:, None] * N + mem_n[None, :], dq.to(DQ.dtype.element_ty))
        tl.store(QDQ + scalar_base + t, q_dq)
        k_to_end = (k * (tl.exp(chunk_total - cs) * w)[:, None]).to(k.dtype)
        state = state * tl.exp(chunk_total) + _mm(tl.trans(k_to_end), x, PRECISION, UPCAST)
    if HAS_BIAS:  # this program's share of the bias gradient: (B, H, NUM_BLOCKS, N)
        tl.store(DQBIAS + (pid_bh * NUM_BLOCKS + pid_block) * N + mem_n, bias_grad)


@triton.jit
def _chunk_dkdx_kernel(
    Cq, Bk, X, DY, ALOG, W, GD, DSTATE_OUT, DK, DX, DW, DG, QBIAS, KBIAS, DT, PT, PHI0, DPHI, DDT, DPHI0, DKBIAS,
    DSKIP, DD,
    L, H: tl.constexpr, G: tl.constexpr, H_FWD, NUM_CHUNKS, CHUNKS_PER_BLOCK, NUM_BLOCKS,
    N: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BATCH_PER_BIAS, S: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr, FAST: tl.constexpr,
    HAS_D: tl.constexpr, STAGES: tl.constexpr, PART: tl.constexpr,
):
    """dB per head (B, L, H, N) (unrotated), dx (B, L, H, P), dw and dg (B, H, L), walking the block's chunks backward.
    ``PART``: 0 all of it; 1 the dB side (dB, dw, dg, angles, bias); 2 the x side (dx, dD). Split in two launches,
    each walks the reverse state itself, with fewer live tiles per program (see ``SPLIT_DKDX``).

    DSTATE_OUT (B, H, NUM_BLOCKS, N, P): ``Σ_{t > block end} e^{cs_t - cs_end} C̄_t dy_tᵀ``.
    With rotation, dφ_t = (C side, read from DPHI) + (B side) gives: DPHI0 (B, H, NUM_CHUNKS, S) = Σ_chunk dφ_t (the
    chunk's start angle), and with E_t = Σ_{t <= r in the chunk} dφ_r: DDT (B, H, L) = Σ_j E_tj π tanh(θ_tj) and
    DPHI (overwritten) = Δ_t E_t (its sum over heads is the gradient of π tanh(θ)). With D: dx += D dy, and DD
    (B, H, NUM_BLOCKS) gets this program's Σ dy·x.
    """
    pid_block, pid_bh, batch, head, group, rev, scalar_base, bias_base, pt_base, phi0_base = _program_ids(
        H, G, H_FWD, BATCH_PER_BIAS, L, NUM_CHUNKS, S, N)
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, N)
    mem_n = _state_order(N, S, ROTATE)
    offs_p = tl.arange(0, P)
    above = offs_t[None, :] > offs_t[:, None]  # [s, t]: t > s
    diagonal = offs_t[:, None] == offs_t[None, :]
    dstate = tl.load(DSTATE_OUT + (pid_bh * NUM_BLOCKS + pid_block) * (N * P) + offs_n[:, None] * P + offs_p[None, :])
    bias_grad = tl.zeros((N,), dtype=tl.float32)
    d_skip = tl.sum(tl.zeros((CHUNK,), dtype=tl.float32), axis=0)
    first = pid_block * CHUNKS_PER_BLOCK
    last = tl.minimum(first + CHUNKS_PER_BLOCK, NUM_CHUNKS)
    for step in tl.range(0, last - first, num_stages=STAGES):
        chunk = last - 1 - step
        t, m, w, g, cs, chunk_total, cos, sin, dt, pt = _chunk_inputs(
            ALOG, W, GD, DT, PT, PHI0, chunk, L, rev, scalar_base, pt_base, phi0_base, S, CHUNK, ROTATE, FAST)
        key_rows = (batch * L + m) * (G * N) + group * N
        q = _load_key(Cq, key_rows, QBIAS, bias_base, mem_n, cos, sin, HAS_BIAS, ROTATE, CHUNK, N).to(X.dtype.element_ty)
        k_wide = _load_key(Bk, key_rows, KBIAS, bias_base, mem_n, cos, sin, HAS_BIAS, ROTATE, CHUNK, N)
        k = k_wide.to(X.dtype.element_ty)
        xy_offs = ((batch * L + m) * H + head)[:, None] * P + offs_p[None, :]
        x = tl.load(X + xy_offs)
        dy = tl.load(DY + xy_offs)
        to_end = tl.exp(chunk_total - cs)
        decay = tl.where(above, tl.exp(tl.minimum(cs[None, :] - cs[:, None], 0.0)), 0.0)
        if PART != 2:  # dB side: dB̄, dw, dg (+ angles and bias with inline rotation)
            x_dy = _mm(x, tl.trans(dy), PRECISION, UPCAST)  # [s, t] = x_s · dy_t
            dk_raw = _mm(x, tl.trans(dstate).to(x.dtype), PRECISION, UPCAST) * to_end[:, None]
            dk_raw += _mm((x_dy * decay).to(q.dtype), q, PRECISION, UPCAST)
            diag_xdy = tl.sum(tl.where(diagonal, x_dy, 0.0), axis=1)
            dw = tl.sum(dk_raw * k.to(tl.float32), axis=1)
            dk = dk_raw * w[:, None] + (g * diag_xdy)[:, None] * q.to(tl.float32)
            if ROTATE:
                dk, dphi = _unrotate(dk, k_wide, cos, sin, CHUNK, N)
                offs_j = tl.arange(0, S)
                dphi_offs = (pid_bh * L + m[:, None]) * S + offs_j[None, :]
                dphi += tl.load(DPHI + dphi_offs)
                chunk_dphi = tl.sum(dphi, axis=0)
                suffix = chunk_dphi[None, :] - tl.cumsum(dphi, axis=0) + dphi
                tl.store(DPHI0 + phi0_base + chunk * S + offs_j, chunk_dphi)
                tl.store(DDT + scalar_base + t, tl.sum(suffix * pt, axis=1))
                tl.store(DPHI + dphi_offs, suffix * dt[:, None])
            if HAS_BIAS:
                bias_grad += tl.sum(dk, axis=0)
            tl.store(DK + ((batch * L + m) * H + head)[:, None] * N + mem_n[None, :], dk.to(DK.dtype.element_ty))
            tl.store(DW + scalar_base + t, dw)
            diag_qk = tl.sum(k.to(tl.float32) * q.to(tl.float32), axis=1)  # B̄_t · C̄_t
            tl.store(DG + scalar_base + t, diag_qk * diag_xdy)
        if PART != 1:  # x side: dx (+ D dy, dD)
            k_q = _mm(k, tl.trans(q), PRECISION, UPCAST)  # [s, t] = B̄_s · C̄_t
            weight = decay * w[:, None] + tl.where(diagonal, g[:, None], 0.0)
            dx = _mm(k, dstate.to(k.dtype), PRECISION, UPCAST) * (to_end * w)[:, None]
            dx += _mm((k_q * weight).to(dy.dtype), dy, PRECISION, UPCAST)
            if HAS_D:
                dx += tl.load(DSKIP + head) * dy.to(tl.float32)
                d_skip += tl.sum(tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=1), axis=0)
            tl.store(DX + xy_offs, dx.to(DX.dtype.element_ty))
        q_from_start = (q * tl.exp(cs)[:, None]).to(q.dtype)
        dstate = dstate * tl.exp(chunk_total) + _mm(tl.trans(q_from_start), dy, PRECISION, UPCAST)
    if HAS_BIAS and PART != 2:
        tl.store(DKBIAS + (pid_bh * NUM_BLOCKS + pid_block) * N + mem_n, bias_grad)
    if HAS_D and PART != 1:
        tl.store(DD + pid_bh * NUM_BLOCKS + pid_block, d_skip)


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


@triton.jit
def _write_rotated(SRC, BIAS, OUT, in_rows, out_rows, valid, bias_base, cos, sin, S: tl.constexpr, N: tl.constexpr,
                   ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr):
    """OUT[rows] = R(φ)(SRC[rows] + bias) for one tile: the pairs (2j, 2j + 1), j < S, rotate; the rest is copied."""
    offs_s = tl.arange(0, S)
    real = 2 * S + tl.arange(0, N - 2 * S)
    a, b = _load_pairs(SRC, in_rows, valid, S, ROWS)
    r = tl.load(SRC + in_rows[:, None] + real[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(BIAS + bias_base + 2 * offs_s)[None, :]
        b += tl.load(BIAS + bias_base + 2 * offs_s + 1)[None, :]
        r += tl.load(BIAS + bias_base + real)[None, :]
    if ROTATE:
        a, b = a * cos - b * sin, a * sin + b * cos
    _store_pairs(OUT, out_rows, valid, a, b, S, ROWS)
    tl.store(OUT + out_rows[:, None] + real[None, :], r.to(OUT.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _rotate_keys_kernel(
    Bm, Cm, BBIAS, CBIAS, DT, PT, PHI0, BOUT, COUT,
    L, NUM_CHUNKS, H: tl.constexpr, G: tl.constexpr, H_FWD, N: tl.constexpr, S: tl.constexpr,
    CHUNK: tl.constexpr, ROWS: tl.constexpr, BATCH_PER_BIAS, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr,
    FAST: tl.constexpr,
):
    """Per (tile of ROWS rows, batch*head): B̄ = R(φ)(B + bias_h), C̄ likewise, from per-group B, C (B, L, G, N) to
    per-head BOUT, COUT (B, L, H, N) in their dtype."""
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // H
    head = pid_bh % H
    group = head // (H // G)
    m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = m < L
    in_rows = ((batch * L + m) * G + group) * N
    out_rows = ((batch * L + m) * H + head) * N
    bias_base = ((batch // BATCH_PER_BIAS) * H + head) * N
    if ROTATE:
        cos, sin, dt, pt, t, base_chunk = _tile_angles(DT, PT, PHI0, batch, head, head >= H_FWD, m, valid, L,
                                                       NUM_CHUNKS, H, S, CHUNK, ROWS, FAST)
    else:
        cos = 0.0
        sin = 0.0
    _write_rotated(Bm, BBIAS, BOUT, in_rows, out_rows, valid, bias_base, cos, sin, S, N, ROWS, HAS_BIAS, ROTATE)
    _write_rotated(Cm, CBIAS, COUT, in_rows, out_rows, valid, bias_base, cos, sin, S, N, ROWS, HAS_BIAS, ROTATE)


@triton.jit
def _key_grad(SRC, BIAS, DBAR, DBIAS, in_rows, grad_rows, valid, bias_base, partial_base, cos, sin, S: tl.constexpr,
              N: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr):
    """One head's share of a key's gradient over one tile: the gradient of B̄ (or C̄) taken back through the rotation
    -> (d first members, d second members (ROWS, S), d rest (ROWS, N - 2 S), dφ (ROWS, S)); stores the tile's
    bias-gradient partial."""
    offs_s = tl.arange(0, S)
    real = 2 * S + tl.arange(0, N - 2 * S)
    ga, gb = _load_pairs(DBAR, grad_rows, valid, S, ROWS)
    gr = tl.load(DBAR + grad_rows[:, None] + real[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    dphi = tl.zeros((ROWS, S), dtype=tl.float32)
    if ROTATE:
        a, b = _load_pairs(SRC, in_rows, valid, S, ROWS)
        if HAS_BIAS:
            a += tl.load(BIAS + bias_base + 2 * offs_s)[None, :]
            b += tl.load(BIAS + bias_base + 2 * offs_s + 1)[None, :]
        dphi = gb * (a * cos - b * sin) - ga * (a * sin + b * cos)
        ga, gb = ga * cos + gb * sin, gb * cos - ga * sin
    if HAS_BIAS:
        tl.store(DBIAS + partial_base + 2 * offs_s, tl.sum(ga, axis=0))
        tl.store(DBIAS + partial_base + 2 * offs_s + 1, tl.sum(gb, axis=0))
        tl.store(DBIAS + partial_base + real, tl.sum(gr, axis=0))
    return ga, gb, gr, dphi


@triton.jit
def _key_grads_kernel(
    Bm, Cm, BBIAS, CBIAS, DT, PT, PHI0, DBBAR, DCBAR, DB, DC, DBBIAS, DCBIAS, DDT, DPHI0, DPT,
    L, NUM_CHUNKS, NUM_TILES, H: tl.constexpr, G: tl.constexpr, H_FWD, N: tl.constexpr, S: tl.constexpr,
    CHUNK: tl.constexpr, ROWS: tl.constexpr, BATCH_PER_BIAS, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr,
    FAST: tl.constexpr, STAGES: tl.constexpr,
):
    """Backward of ``_rotate_keys_kernel`` per (tile, batch), looping over the heads.

    DBBAR, DCBAR (B, L, H, N): gradients of B̄, C̄ -> DB, DC (B, L, G, N) fp32 (summed over each group's heads), per-tile
    bias-gradient partials DBBIAS, DCBIAS (B, NUM_TILES, H, N), and with rotation the angle gradients: the tile's
    Σ dφ goes to its base chunk's start angle in DPHI0 (B, H, NUM_CHUNKS, S) (zero elsewhere), and with E_t the
    in-tile suffix sum of dφ in scan order, DDT (B, H, L) = Σ_j E_tj π tanh θ_tj (scan order) and
    DPT (B, L, S) = Σ_heads Δ_t E_t.
    """
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    m = tile * ROWS + tl.arange(0, ROWS)
    valid = m < L
    offs_j = tl.arange(0, S)
    d_pt = tl.zeros((ROWS, S), dtype=tl.float32)
    for group in range(G):
        in_rows = ((batch * L + m) * G + group) * N
        db_a = tl.zeros((ROWS, S), dtype=tl.float32)
        db_b = tl.zeros((ROWS, S), dtype=tl.float32)
        db_r = tl.zeros((ROWS, N - 2 * S), dtype=tl.float32)
        dc_a = tl.zeros((ROWS, S), dtype=tl.float32)
        dc_b = tl.zeros((ROWS, S), dtype=tl.float32)
        dc_r = tl.zeros((ROWS, N - 2 * S), dtype=tl.float32)
        for member in tl.range(0, H // G, num_stages=STAGES):
            head = group * (H // G) + member
            rev = head >= H_FWD
            grad_rows = ((batch * L + m) * H + head) * N
            bias_base = ((batch // BATCH_PER_BIAS) * H + head) * N
            partial_base = ((batch * NUM_TILES + tile) * H + head) * N
            if ROTATE:
                cos, sin, dt, pt, t, base_chunk = _tile_angles(DT, PT, PHI0, batch, head, rev, m, valid, L,
                                                               NUM_CHUNKS, H, S, CHUNK, ROWS, FAST)
            else:
                cos = 0.0
                sin = 0.0
            ga, gb, gr, dphi_b = _key_grad(Bm, BBIAS, DBBAR, DBBIAS, in_rows, grad_rows, valid, bias_base,
                                           partial_base, cos, sin, S, N, ROWS, HAS_BIAS, ROTATE)
            db_a += ga
            db_b += gb
            db_r += gr
            ga, gb, gr, dphi_c = _key_grad(Cm, CBIAS, DCBAR, DCBIAS, in_rows, grad_rows, valid, bias_base,
                                           partial_base, cos, sin, S, N, ROWS, HAS_BIAS, ROTATE)
            dc_a += ga
            dc_b += gb
            dc_r += gr
            if ROTATE:
                dphi = dphi_b + dphi_c
                forward_sum = tl.cumsum(dphi, axis=0)
                suffix = tl.where(rev, forward_sum, tl.sum(dphi, axis=0)[None, :] - forward_sum + dphi)
                tl.store(DPHI0 + ((batch * H + head) * NUM_CHUNKS + base_chunk) * S + offs_j, tl.sum(dphi, axis=0))
                tl.store(DDT + (batch * H + head) * L + t, tl.sum(suffix * pt, axis=1), mask=valid)
                d_pt += suffix * dt[:, None]
        real = 2 * S + tl.arange(0, N - 2 * S)
        _store_pairs(DB, in_rows, valid, db_a, db_b, S, ROWS)
        tl.store(DB + in_rows[:, None] + real[None, :], db_r, mask=valid[:, None])
        _store_pairs(DC, in_rows, valid, dc_a, dc_b, S, ROWS)
        tl.store(DC + in_rows[:, None] + real[None, :], dc_r, mask=valid[:, None])
    if ROTATE:
        tl.store(DPT + (batch * L + m)[:, None] * S + offs_j[None, :], d_pt, mask=valid[:, None])


def _tile_rows(chunk_size: int) -> int:
    """Rows per program of the rotation passes: a whole number of chunks, at least 64."""
    return chunk_size * max(1, 64 // chunk_size)


class _RotatedKeys(torch.autograd.Function):
    """Per-group B, C (B, L, G, N) -> per-head B̄, C̄ (B, L, H, N) in x's dtype: bias added, rotated by the
    cumulative angles (``_rotate_keys_kernel``); backward: ``_key_grads_kernel``.

    dt (B, H, L) fp32 scan order; pt (B, L, S) fp32 memory order; phi0 (B, H, L / CHUNK, S) fp32 (None, None: no
    rotation); biases (NB, H, N) fp32 or None. Lengths are whole chunks."""

    @staticmethod
    def forward(ctx, Bm, Cm, B_bias, C_bias, dt, pt, phi0, heads, fwd_heads, chunk_size, dtype):
        batch, length, groups, state_dim = Bm.shape
        rotate, has_bias = pt is not None, B_bias is not None
        rows = _tile_rows(chunk_size)
        dims = dict(L=length, NUM_CHUNKS=length // chunk_size, H=heads, G=groups, H_FWD=fwd_heads, N=state_dim,
                    S=state_dim // 4, CHUNK=chunk_size, ROWS=rows,
                    BATCH_PER_BIAS=batch // B_bias.shape[0] if has_bias else 1, HAS_BIAS=has_bias, ROTATE=rotate,
                    FAST=not _INTERPRETED)
        dummy = Bm
        args = (B_bias if has_bias else dummy, C_bias if has_bias else dummy,
                *((dt, pt, phi0) if rotate else (dummy, dummy, dummy)))
        B_bar = torch.empty(batch, length, heads, state_dim, device=Bm.device, dtype=dtype)
        C_bar = torch.empty_like(B_bar)
        _rotate_keys_kernel[(triton.cdiv(length, rows), batch * heads)](
            Bm, Cm, *args, B_bar, C_bar, num_warps=ROTATION_LAUNCH["num_warps"], **dims)
        ctx.save_for_backward(Bm, Cm, *args)
        ctx.dims = dims
        return B_bar, C_bar

    @staticmethod
    def backward(ctx, dB_bar, dC_bar):
        Bm, Cm, B_bias, C_bias, dt, pt, phi0 = ctx.saved_tensors
        dims = ctx.dims
        batch, length, groups, state_dim = Bm.shape
        heads, rotate, has_bias = dims["H"], dims["ROTATE"], dims["HAS_BIAS"]
        num_tiles = triton.cdiv(length, dims["ROWS"])
        dB = torch.empty(Bm.shape, device=Bm.device, dtype=torch.float32)
        dC = torch.empty_like(dB)
        f32 = dict(device=Bm.device, dtype=torch.float32)
        bias_parts = [torch.empty(batch, num_tiles, heads, state_dim, **f32) for _ in range(2)] if has_bias \
            else [dB, dB]
        ddt, dphi0, dpt = (torch.empty_like(dt), torch.zeros_like(phi0), torch.empty_like(pt)) if rotate \
            else (dB, dB, dB)
        _key_grads_kernel[(num_tiles, batch)](Bm, Cm, B_bias, C_bias, dt, pt, phi0, dB_bar.contiguous(),
                                              dC_bar.contiguous(), dB, dC, *bias_parts, ddt, dphi0, dpt,
                                              NUM_TILES=num_tiles, STAGES=ROTATION_LAUNCH["num_stages"],
                                              num_warps=ROTATION_LAUNCH["bwd_num_warps"], **dims)
        d_bias = [None, None]
        if has_bias:
            per_bias = (B_bias.shape[0], batch // B_bias.shape[0], num_tiles, heads, state_dim)
            d_bias = [part.view(per_bias).sum((1, 2)) for part in bias_parts]
        if not rotate:
            ddt = dphi0 = dpt = None
        return (dB.to(Bm.dtype), dC.to(Cm.dtype), *d_bias, ddt, dpt, dphi0, None, None, None, None)


def _num_blocks(num_chunks: int, batch_heads: int, target_programs: int) -> tuple[int, int]:
    """-> (chunks per block, number of blocks) giving about ``target_programs`` programs over (blocks, batch*heads)."""
    wanted = max(1, min(num_chunks, target_programs // batch_heads))
    per_block = -(-num_chunks // wanted)
    return per_block, -(-num_chunks // per_block)


class _Mamba3ScanCore(torch.autograd.Function):
    """y = quadratic form of (C̄, B̄, x, log-decay, w, g) (+ D x) with C̄, B̄ built in-kernel; inputs as in
    ``mamba3_scan``, padded to whole chunks.

    q, k (B, L, G, N) in x's dtype (unbiased, unrotated); a_log, w, g, dt (B, H, L) fp32 in each head's scan order;
    pt = π tanh(θ) (B, L, S) fp32 (memory order) and phi0 (B, H, L / CHUNK, S) fp32 (each chunk's starting angle,
    scan order) or None (no rotation); q_bias, k_bias (NB, H, N) fp32 or None (batch row b uses bias row
    b // (B / NB)); d_skip (H,) fp32 or None; heads >= ``fwd_heads`` scan right to left.
    """

    @staticmethod
    def forward(ctx, q, k, x, a_log, w, g, dt, pt, phi0, q_bias, k_bias, d_skip, fwd_heads, chunk_size, launch):
        batch, length, heads, headdim = x.shape
        groups, state_dim = q.shape[2], q.shape[3]
        num_chunks = length // chunk_size
        target_programs, num_warps, bwd_num_warps, stages = launch
        per_block, num_blocks = _num_blocks(num_chunks, batch * heads, target_programs)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        rotate, has_bias, has_d = pt is not None, q_bias is not None, d_skip is not None
        dims = dict(L=length, H=heads, G=groups, H_FWD=fwd_heads, NUM_CHUNKS=num_chunks, CHUNKS_PER_BLOCK=per_block,
                    NUM_BLOCKS=num_blocks, N=state_dim, P=headdim, CHUNK=chunk_size, PRECISION=precision,
                    UPCAST=_INTERPRETED, BATCH_PER_BIAS=batch // q_bias.shape[0] if has_bias else 1,
                    S=state_dim // 4, HAS_BIAS=has_bias, ROTATE=rotate, FAST=not _INTERPRETED, STAGES=stages)
        dummy = a_log
        rot_args = (dt, pt, phi0) if rotate else (dummy, dummy, dummy)
        qb, kb = (q_bias, k_bias) if has_bias else (dummy, dummy)
        d_arg = d_skip if has_d else dummy
        grid = (num_blocks, batch * heads)
        state_in = torch.empty(batch, heads, num_blocks, state_dim, headdim, device=x.device, dtype=torch.float32)
        if num_blocks > 1:
            block_decay = torch.empty(batch, heads, num_blocks, device=x.device, dtype=torch.float32)
            _block_state_kernel[grid](k, x, a_log, w, state_in, block_decay, kb, *rot_args, REVERSE=False,
                                      num_warps=num_warps, **dims)
            _scan_blocks(state_in, block_decay, reverse=False)
        else:
            state_in.zero_()
        y = torch.empty_like(x)
        _chunk_forward_kernel[grid](q, k, x, a_log, w, g, state_in, y, qb, kb, *rot_args, d_arg, HAS_D=has_d,
                                    num_warps=num_warps, **dims)
        # with one block the incoming states are zeros: made again in backward instead of kept alive until then
        ctx.save_for_backward(q, k, x, a_log, w, g, state_in if num_blocks > 1 else None, *rot_args, qb, kb, d_arg)
        ctx.launch = (grid, dims, bwd_num_warps, has_d)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, x, a_log, w, g, state_in, dt, pt, phi0, qb, kb, d_arg = ctx.saved_tensors
        if state_in is None:
            state_in = torch.zeros(x.shape[0], x.shape[2], 1, q.shape[3], x.shape[3], device=x.device,
                                   dtype=torch.float32)
        grid, dims, bwd_warps, has_d = ctx.launch
        rotate, has_bias = dims["ROTATE"], dims["HAS_BIAS"]
        dy = dy.contiguous().to(x.dtype)
        batch, length, heads, headdim = x.shape
        groups, state_dim, num_blocks = q.shape[2], q.shape[3], dims["NUM_BLOCKS"]
        dstate_out = torch.empty_like(state_in)
        if num_blocks > 1:
            block_decay = torch.empty(batch, heads, num_blocks, device=x.device, dtype=torch.float32)
            _block_state_kernel[grid](q, dy, a_log, w, dstate_out, block_decay, qb, dt, pt, phi0, REVERSE=True,
                                      num_warps=bwd_warps, **dims)
            _scan_blocks(dstate_out, block_decay, reverse=True)
        else:
            dstate_out.zero_()
        # per-head gradients of the per-group B and C, in x's dtype (bf16 on the GPU: half the bytes of fp32)
        dq = torch.empty(batch, length, heads, state_dim, device=x.device, dtype=x.dtype)
        dk = torch.empty_like(dq)
        dx = torch.empty_like(x)
        q_dq, dw, dg = (torch.empty_like(a_log) for _ in range(3))
        if rotate:
            dphi = torch.empty(batch, heads, length, dims["S"], device=x.device, dtype=torch.float32)
            ddt, dphi0 = torch.empty_like(a_log), torch.empty_like(phi0)
        else:
            dphi = ddt = dphi0 = a_log  # unused
        if has_bias:  # per-program partial sums of the bias gradients
            dq_bias_part = torch.empty(batch, heads, num_blocks, state_dim, device=x.device, dtype=torch.float32)
            dk_bias_part = torch.empty_like(dq_bias_part)
        else:
            dq_bias_part = dk_bias_part = a_log  # unused
        d_skip_part = torch.empty(batch, heads, num_blocks, device=x.device, dtype=torch.float32) if has_d else a_log
        _chunk_dq_kernel[grid](q, k, x, dy, a_log, w, g, state_in, dq, q_dq, qb, kb, dt, pt, phi0, dphi,
                               dq_bias_part, num_warps=bwd_warps, **dims)
        for part in (1, 2) if SPLIT_DKDX else (0,):
            _chunk_dkdx_kernel[grid](q, k, x, dy, a_log, w, g, dstate_out, dk, dx, dw, dg, qb, kb, dt, pt, phi0,
                                     dphi, ddt, dphi0, dk_bias_part, d_arg, d_skip_part, HAS_D=has_d, PART=part,
                                     num_warps=bwd_warps, **dims)
        d_cs = q_dq - w * dw
        d_alog = d_cs.sum(-1, keepdim=True) - torch.cumsum(d_cs, -1) + d_cs  # reverse cumulative sum
        d_qbias = d_kbias = None
        if has_bias:
            per_bias = (qb.shape[0], batch // qb.shape[0], heads, num_blocks, state_dim)
            d_qbias = dq_bias_part.view(per_bias).sum((1, 3))
            d_kbias = dk_bias_part.view(per_bias).sum((1, 3))
        if groups != heads:
            dq = dq.unflatten(2, (groups, heads // groups)).sum(3, dtype=torch.float32)
            dk = dk.unflatten(2, (groups, heads // groups)).sum(3, dtype=torch.float32)
        d_pt = dphi.sum(1) if rotate else None
        if not rotate:
            ddt = dphi0 = None
        d_d = d_skip_part.sum((0, 2)) if has_d else None
        return (dq.to(q.dtype), dk.to(k.dtype), dx, d_alog, dw, dg, ddt, d_pt, dphi0, d_qbias, d_kbias, d_d,
                None, None, None)


def _scan_blocks(state: torch.Tensor, block_decay: torch.Tensor, reverse: bool) -> None:
    """In place: state (B, H, NUM_BLOCKS, N, P) local block sums -> states entering each block (see kernel)."""
    batch, heads, num_blocks, state_dim, headdim = state.shape
    size = state_dim * headdim
    tile = min(BLOCK_SCAN_TILE, size)
    _block_scan_kernel[(batch * heads, triton.cdiv(size, tile))](
        state, block_decay, num_blocks, SIZE=size, TILE=tile, REVERSE=reverse
    )


def _check_shapes(x, dt, Bm, Cm, chunk_size, reversed_heads):
    batch, length, heads, headdim = x.shape
    if dt.shape != (batch, length, heads):
        raise ValueError(f"mamba3_scan: dt has shape {tuple(dt.shape)} (expected {(batch, length, heads)})")
    if Bm.shape != Cm.shape or Bm.dim() != 4 or Bm.shape[:2] != (batch, length) or heads % Bm.shape[2]:
        raise ValueError(
            f"mamba3_scan: Bm {tuple(Bm.shape)} / Cm {tuple(Cm.shape)} must both be (B, L, G, N) with G dividing "
            f"H={heads}"
        )
    for name, size in (("headdim", headdim), ("chunk_size", chunk_size)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"mamba3_scan (Triton): {name}={size} must be a power of two >= 16")
    state_dim = Bm.shape[3]
    if state_dim < 16 or state_dim & (state_dim - 1):
        raise ValueError(f"mamba3_scan (Triton): d_state={state_dim} must be a power of two >= 16")
    if not 0 <= reversed_heads <= heads:
        raise ValueError(f"mamba3_scan: reversed_heads={reversed_heads} must be in [0, H={heads}]")


def supports(d_state: int, headdim: int, chunk_size: int) -> bool:
    """Whether the Triton op takes these sizes on the GPU (the layer uses the PyTorch path otherwise)."""
    return all(size >= 16 and size & (size - 1) == 0 for size in (d_state, headdim, chunk_size))


# Launch settings used when a call gives none (benchmarks/mamba3.py measured them on an H100; see BENCHMARKS.md).
LAUNCH_DEFAULTS = dict(target_programs=768, num_warps=4, bwd_num_warps=4, num_stages=3)
# Above this many chunks the start angles' cumulative sum runs on a transposed copy (see ``mamba3_scan``).
LONG_SCAN_CHUNKS = 256
# Whether the dB side and the x side of the backward walk run as two launches (``_chunk_dkdx_kernel`` PART 1, 2).
SPLIT_DKDX = True
# Warps of the rotation pass and of its gradient pass, and the pipelining depth of the latter's loop over heads.
ROTATION_LAUNCH = dict(num_warps=4, bwd_num_warps=4, num_stages=2)
# Elements of the (N, P) states per program of the block scan (more programs: shorter dependent load/store chains).
BLOCK_SCAN_TILE = 256


def _scan_order(v: torch.Tensor, fwd_heads: int) -> torch.Tensor:
    """(B, H, L) -> each head's scan order: heads >= fwd_heads reversed along L."""
    if fwd_heads == v.shape[1]:
        return v
    return torch.cat((v[:, :fwd_heads], v[:, fwd_heads:].flip(-1)), dim=1)


def mamba3_scan(x, dt, A, lam, Bm, Cm, D=None, chunk_size: int = 32, target_programs: int | None = None,
                num_warps: int | None = None, bwd_num_warps: int | None = None, *, B_bias=None, C_bias=None,
                theta=None, reversed_heads: int = 0, num_stages: int | None = None, inline_rotation: bool = False):
    """Mamba-3 SISO scan on CUDA (or under TRITON_INTERPRET=1 on CPU). Shapes in the module docstring.

    Without ``B_bias``, ``C_bias`` and ``theta``, Bm and Cm are B̄ and C̄ as they are. With them (fused path) Bm and Cm
    are per group and unrotated, and the kernels form ``B̄ = R(φ) (Bm + B_bias)`` per head on the fly:
    B_bias, C_bias (H, N) or (NB, H, N) (batch row b uses row b // (B / NB); both or neither), theta (B, L, S) with
    ``S = N / 4`` rotates pairs (2j, 2j+1), j < S, by ``φ_t = Σ_{r<=t} Δ_r π tanh(θ_r)`` (``cumulative_angles``).
    ``inline_rotation``: form B̄, C̄ inside the scan kernels (per chunk, in every kernel that reads them) instead of
    in one parallel pass before the scan (``_rotate_keys_kernel``; its backward ``_key_grads_kernel`` takes the
    per-head gradients back through the rotation and sums them over the heads). The separate pass is the default:
    it keeps the rotation out of the scan's sequential chunk loop (see BENCHMARKS.md).
    ``reversed_heads``: the last that many heads scan the sequence right to left (their outputs are those of the
    reference run on the flipped sequence, flipped back), in the same launch as the left-to-right heads.
    ``num_warps`` / ``bwd_num_warps``: warps per program of the forward / backward kernels; ``num_stages``: software
    pipelining depth of the chunk loops (1: none).
    ``target_programs`` sets how many (block, batch*head) programs to aim for (the sequence is cut into that many
    blocks when batch*heads is small). Returns y (B, L, H, P) in x's dtype.
    """
    _check_shapes(x, dt, Bm, Cm, chunk_size, reversed_heads)
    launch = tuple(LAUNCH_DEFAULTS[key] if value is None else value for key, value in
                   (("target_programs", target_programs), ("num_warps", num_warps), ("bwd_num_warps", bwd_num_warps),
                    ("num_stages", num_stages)))
    batch, length, heads, _ = x.shape
    fwd_heads = heads - reversed_heads
    if (B_bias is None) != (C_bias is None):
        raise ValueError("mamba3_scan: pass both B_bias and C_bias or neither")
    if B_bias is not None:
        if B_bias.dim() == 2:
            B_bias, C_bias = B_bias[None], C_bias[None]
        expected = (heads, Bm.shape[3])
        if B_bias.shape != C_bias.shape or B_bias.shape[1:] != expected or batch % B_bias.shape[0]:
            raise ValueError(f"mamba3_scan: B_bias {tuple(B_bias.shape)} / C_bias {tuple(C_bias.shape)} must be "
                             f"(H, N) = {expected} or (NB, H, N) with NB dividing the batch {batch}")
        B_bias, C_bias = B_bias.float().contiguous(), C_bias.float().contiguous()
    if theta is not None and (theta.shape[:2] != (batch, length) or 4 * theta.shape[2] != Bm.shape[3]):
        raise ValueError(f"mamba3_scan: theta {tuple(theta.shape)} must be (B, L, S) = ({batch}, {length}, "
                         f"{Bm.shape[3] // 4}) (S = d_state / 4: the first half of the state rotates)")
    if D is not None and D.shape != (heads,):
        raise ValueError(f"mamba3_scan: D has shape {tuple(D.shape)} (expected ({heads},))")
    pad = (-length) % chunk_size
    padded = length + pad
    xs, Cq, Bk = x, Cm.to(x.dtype), Bm.to(x.dtype)
    # per-head scalars in each head's scan order, (B, H, L) fp32; padding (Δ = 0: no state change) at the memory end
    stacked = torch.stack((dt.float(), A.float(), lam.float()))  # (3, B, L, H)
    stacked = _scan_order(F.pad(stacked, (0, 0, 0, pad)).permute(0, 1, 3, 2).flatten(0, 1), fwd_heads).contiguous()
    dt_s, A_s, lam_s = stacked.unflatten(0, (3, batch)).unbind(0)  # each (B, H, L), contiguous
    g = lam_s * dt_s
    w = g + F.pad(((1 - lam_s) * dt_s)[..., 1:], (0, 1))  # trapezoid: w_s = g_s + (1 - λ_{s+1}) Δ_{s+1}
    a_log = dt_s * A_s
    pt = phi0 = None
    if theta is not None:
        pt = F.pad(math.pi * torch.tanh(theta.float()), (0, 0, 0, pad)).contiguous()  # (B, L, S), memory order
        num_chunks = padded // chunk_size
        with torch.autocast(x.device.type, enabled=False):  # angles stay fp32 (bf16 would lose whole turns)
            turns = []
            for heads_dt, pt_order in ((dt_s[:, :fwd_heads], pt), (dt_s[:, fwd_heads:], pt.flip(1))):
                if heads_dt.shape[1]:
                    turns.append(torch.einsum("bhcq,bcqs->bhcs", heads_dt.unflatten(2, (num_chunks, chunk_size)),
                                              pt_order.unflatten(1, (num_chunks, chunk_size))))
            chunk_turn = torch.cat(turns, dim=1)  # (B, H, chunks, S)
            # the angle before each chunk; PyTorch's scan kernels are slow along a long middle axis (64K tokens: 0.8
            # ms) and along a short last axis (1K tokens, batch 64: 0.6 ms), so long sequences scan a transposed copy
            if num_chunks > LONG_SCAN_CHUNKS:
                phi0 = (torch.cumsum(chunk_turn.transpose(2, 3), dim=-1) - chunk_turn.transpose(2, 3)).transpose(2, 3)
            else:
                phi0 = torch.cumsum(chunk_turn, dim=2) - chunk_turn
            phi0 = phi0.contiguous()
    if pad:
        pad_tokens = (0, 0, 0, 0, 0, pad)
        xs, Cq, Bk = (F.pad(v, pad_tokens) for v in (x, Cq, Bk))
    d_skip = None if D is None else D.float()
    if (B_bias is not None or pt is not None) and not inline_rotation:
        # B̄, C̄ per head from one parallel pass (and their gradients from one more), then the plain scan
        Bk, Cq = _RotatedKeys.apply(Bk.contiguous(), Cq.contiguous(), B_bias, C_bias, dt_s, pt, phi0, heads,
                                    fwd_heads, chunk_size, x.dtype)
        B_bias = C_bias = pt = phi0 = None
    y = _Mamba3ScanCore.apply(Cq.contiguous(), Bk.contiguous(), xs.contiguous(), a_log, w, g, dt_s, pt, phi0, C_bias,
                              B_bias, d_skip, fwd_heads, chunk_size, launch)
    return y[:, :length]
