"""Backward Triton kernels of the Mamba-3 scan (the op and its algorithm: ``kernels/mamba3_scan.py``; reference:
``kernels/mamba3_scan_ref.py``).

``_chunk_dq_kernel`` walks each block's chunks forward from the saved incoming states (dC̄), ``_chunk_dkdx_kernel``
walks them backward from the reverse states (dB̄, dx, the trapezoid weights' gradients), ``_key_grads_kernel`` takes
dB̄, dC̄ back through the rotation pass (``_rotate_keys_kernel``) to the per-group B, C, the biases and the angles.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .mamba3_scan_common import (_block_tile, _chunk_inputs, _load_key, _load_pairs, _mm, _program_ids,
                                 _store_pairs, _tile_angles, _unrotate)


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
    offs_t, offs_n, mem_n, offs_p, diagonal, state = _block_tile(
        STATE_IN, pid_bh, pid_block, NUM_BLOCKS, N, P, CHUNK, S, ROTATE)
    below = offs_t[:, None] > offs_t[None, :]
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
    each walks the reverse state itself, with fewer live tiles per program (``ScanSettings.split_dkdx``).

    DSTATE_OUT (B, H, NUM_BLOCKS, N, P): ``Σ_{t > block end} e^{cs_t - cs_end} C̄_t dy_tᵀ``.
    With rotation, dφ_t = (C side, read from DPHI) + (B side) gives: DPHI0 (B, H, NUM_CHUNKS, S) = Σ_chunk dφ_t (the
    chunk's start angle), and with E_t = Σ_{t <= r in the chunk} dφ_r: DDT (B, H, L) = Σ_j E_tj π tanh(θ_tj) and
    DPHI (overwritten) = Δ_t E_t (its sum over heads is the gradient of π tanh(θ)). With D: dx += D dy, and DD
    (B, H, NUM_BLOCKS) gets this program's Σ dy·x.
    """
    pid_block, pid_bh, batch, head, group, rev, scalar_base, bias_base, pt_base, phi0_base = _program_ids(
        H, G, H_FWD, BATCH_PER_BIAS, L, NUM_CHUNKS, S, N)
    offs_t, offs_n, mem_n, offs_p, diagonal, dstate = _block_tile(
        DSTATE_OUT, pid_bh, pid_block, NUM_BLOCKS, N, P, CHUNK, S, ROTATE)
    above = offs_t[None, :] > offs_t[:, None]  # [s, t]: t > s
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
