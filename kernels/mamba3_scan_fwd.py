"""Forward Triton kernels of the Mamba-3 scan (the op and its algorithm: ``kernels/mamba3_scan.py``; reference:
``kernels/mamba3_scan_ref.py``).

``_block_state_kernel`` and ``_block_scan_kernel`` give the state entering each block of chunks (the backward pass
runs them in reverse for the state gradient); ``_chunk_forward_kernel`` walks a block's chunks; ``_rotate_keys_kernel``
forms the per-head B̄, C̄ in one parallel pass before the scan.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .mamba3_scan_common import (_block_tile, _chunk_inputs, _load_key, _load_pairs, _mm, _program_ids, _state_order,
                                 _store_pairs, _tile_angles)


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
    offs_t, offs_n, mem_n, offs_p, diagonal, state = _block_tile(
        STATE_IN, pid_bh, pid_block, NUM_BLOCKS, N, P, CHUNK, S, ROTATE)
    below = offs_t[:, None] > offs_t[None, :]
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
