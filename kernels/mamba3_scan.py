"""Mamba-3 scan in Triton: chunk-parallel forward and backward (reference: ``kernels/mamba3_scan_ref.py``).

Public op::

    mamba3_scan(x (B, L, H, P), dt (B, L, H), A (B, L, H), lam (B, L, H),
                Bm (B, L, G, N), Cm (B, L, G, N), D (H) | None, chunk_size=64) -> y (B, L, H, P)

``Bm`` and ``Cm`` are ``B̄`` and ``C̄``, i.e. already normalised, biased and rotated (pass G = H when they are per
head); ``dt`` is Δ (softplus done, 0 at padding), ``A`` is negative, ``lam`` is λ in [0, 1]. x, Bm and Cm share a
dtype (bf16 or fp32); the state and every accumulation are fp32. Differentiable in all inputs.

Algorithm. The op is the quadratic form ``y_t = Σ_{s<t} (C̄_t·B̄_s) e^{cs_t - cs_s} w_s x_s + g_t (C̄_t·B̄_t) x_t``
with ``cs`` the cumulative ``Δ A``, ``g = λΔ`` and ``w_s = g_s + (1 - λ_{s+1}) Δ_{s+1}`` (see the reference). The
sequence is cut into chunks of ``chunk_size`` tokens and the chunks into *blocks* of several chunks. One program
handles one (batch, head, block), so a batch of 1 with a long sequence still gives thousands of programs:

1. ``_block_state_kernel``: each block's end state from a zero start, ``Σ_s e^{cs_end - cs_s} w_s B̄_s x_sᵀ`` (N, P);
2. ``_block_scan_kernel``: a short sequential scan over blocks turns those into each block's incoming state;
3. ``_chunk_forward_kernel``: each block walks its chunks: intra-chunk quadratic form plus ``C̄_t`` times the state.

Backward runs the same structure: the reverse state ``Σ_{t>end} e^{cs_t - cs_end} C̄_t dy_tᵀ`` per block (kernels 1
and 2 in reverse), ``_chunk_dq_kernel`` (forward walk from the saved incoming states) and ``_chunk_dkdx_kernel``
(backward walk). The gradient of the log-decay comes out as ``d cs_t = C̄_t·dC̄_t^{off} - w_t dw_t`` followed by a
reverse cumulative sum along the sequence.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .mamba3_scan_ref import trapezoid_weights

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
def _block_state_kernel(
    U, V, ALOG, W, STATE, BLOCK_DECAY,
    L, H: tl.constexpr, G: tl.constexpr, NUM_CHUNKS, CHUNKS_PER_BLOCK, NUM_BLOCKS,
    N: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per (block, batch*head): forward: Σ_s e^{cs_end - cs_s} w_s u_s v_sᵀ; reverse: Σ_t e^{cs_t - cs_start-1} u_t v_tᵀ.

    U (B, L, G, N), V (B, L, H, P), ALOG/W (B, H, L) fp32 -> STATE (B, H, NUM_BLOCKS, N, P) fp32, BLOCK_DECAY
    (B, H, NUM_BLOCKS) fp32 (the block's total log-decay).
    """
    pid_block = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // H
    head = pid_bh % H
    group = head // (H // G)
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, N)
    offs_p = tl.arange(0, P)
    u_base = U + batch * L * G * N + group * N
    v_base = V + batch * L * H * P + head * P
    scalar_base = pid_bh * L
    acc = tl.zeros((N, P), dtype=tl.float32)
    total = tl.sum(tl.zeros((CHUNK,), dtype=tl.float32), axis=0)
    first = pid_block * CHUNKS_PER_BLOCK
    last = tl.minimum(first + CHUNKS_PER_BLOCK, NUM_CHUNKS)
    for chunk in range(first, last):
        t = chunk * CHUNK + offs_t
        a_log = tl.load(ALOG + scalar_base + t)
        cs = tl.cumsum(a_log, axis=0)
        chunk_total = tl.sum(a_log, axis=0)
        u = tl.load(u_base + t[:, None] * (G * N) + offs_n[None, :])
        v = tl.load(v_base + t[:, None] * (H * P) + offs_p[None, :])
        if REVERSE:
            coef = tl.exp(total + cs)
            acc += _mm(tl.trans((u * coef[:, None]).to(u.dtype)), v, PRECISION, UPCAST)
        else:
            w = tl.load(W + scalar_base + t)
            coef = tl.exp(chunk_total - cs) * w
            acc = acc * tl.exp(chunk_total) + _mm(
                tl.trans((u * coef[:, None]).to(u.dtype)), v, PRECISION, UPCAST
            )
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
    for step in range(NUM_BLOCKS):
        if REVERSE:
            block = NUM_BLOCKS - 1 - step
        else:
            block = step
        local = tl.load(base + block * SIZE)
        tl.store(base + block * SIZE, state)
        state = state * tl.exp(tl.load(BLOCK_DECAY + pid_bh * NUM_BLOCKS + block)) + local


@triton.jit
def _chunk_forward_kernel(
    Cq, Bk, X, ALOG, W, GD, STATE_IN, Y,
    L, H: tl.constexpr, G: tl.constexpr, NUM_CHUNKS, CHUNKS_PER_BLOCK, NUM_BLOCKS,
    N: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y for one (block, batch*head): walks the block's chunks from the block's incoming state."""
    pid_block = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // H
    head = pid_bh % H
    group = head // (H // G)
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, N)
    offs_p = tl.arange(0, P)
    qk_base = batch * L * G * N + group * N
    xy_base = batch * L * H * P + head * P
    scalar_base = pid_bh * L
    below = offs_t[:, None] > offs_t[None, :]
    diagonal = offs_t[:, None] == offs_t[None, :]
    state_ptr = STATE_IN + (pid_bh * NUM_BLOCKS + pid_block) * (N * P) + offs_n[:, None] * P + offs_p[None, :]
    state = tl.load(state_ptr)
    first = pid_block * CHUNKS_PER_BLOCK
    last = tl.minimum(first + CHUNKS_PER_BLOCK, NUM_CHUNKS)
    for chunk in range(first, last):
        t = chunk * CHUNK + offs_t
        a_log = tl.load(ALOG + scalar_base + t)
        w = tl.load(W + scalar_base + t)
        g = tl.load(GD + scalar_base + t)
        cs = tl.cumsum(a_log, axis=0)
        chunk_total = tl.sum(a_log, axis=0)
        qk_offs = qk_base + t[:, None] * (G * N) + offs_n[None, :]
        q = tl.load(Cq + qk_offs)
        k = tl.load(Bk + qk_offs)
        x = tl.load(X + xy_base + t[:, None] * (H * P) + offs_p[None, :])
        y = _mm(q, state.to(q.dtype), PRECISION, UPCAST) * tl.exp(cs)[:, None]
        scores = _mm(q, tl.trans(k), PRECISION, UPCAST)
        decay = tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0))
        weight = tl.where(below, decay * w[None, :], tl.where(diagonal, g[:, None], 0.0))
        y += _mm((scores * weight).to(x.dtype), x, PRECISION, UPCAST)
        tl.store(Y + xy_base + t[:, None] * (H * P) + offs_p[None, :], y.to(Y.dtype.element_ty))
        k_to_end = (k * (tl.exp(chunk_total - cs) * w)[:, None]).to(k.dtype)
        state = state * tl.exp(chunk_total) + _mm(tl.trans(k_to_end), x, PRECISION, UPCAST)


@triton.jit
def _chunk_dq_kernel(
    Cq, Bk, X, DY, ALOG, W, GD, STATE_IN, DQ, QDQ,
    L, H: tl.constexpr, G: tl.constexpr, NUM_CHUNKS, CHUNKS_PER_BLOCK, NUM_BLOCKS,
    N: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dC̄ per head (B, L, H, N) and ``C̄_t·dC̄_t`` without its diagonal term (B, H, L), walking chunks forward."""
    pid_block = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // H
    head = pid_bh % H
    group = head // (H // G)
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, N)
    offs_p = tl.arange(0, P)
    qk_base = batch * L * G * N + group * N
    xy_base = batch * L * H * P + head * P
    dq_base = batch * L * H * N + head * N
    scalar_base = pid_bh * L
    below = offs_t[:, None] > offs_t[None, :]
    diagonal = offs_t[:, None] == offs_t[None, :]
    state_ptr = STATE_IN + (pid_bh * NUM_BLOCKS + pid_block) * (N * P) + offs_n[:, None] * P + offs_p[None, :]
    state = tl.load(state_ptr)
    first = pid_block * CHUNKS_PER_BLOCK
    last = tl.minimum(first + CHUNKS_PER_BLOCK, NUM_CHUNKS)
    for chunk in range(first, last):
        t = chunk * CHUNK + offs_t
        a_log = tl.load(ALOG + scalar_base + t)
        w = tl.load(W + scalar_base + t)
        g = tl.load(GD + scalar_base + t)
        cs = tl.cumsum(a_log, axis=0)
        chunk_total = tl.sum(a_log, axis=0)
        qk_offs = qk_base + t[:, None] * (G * N) + offs_n[None, :]
        q = tl.load(Cq + qk_offs)
        k = tl.load(Bk + qk_offs)
        xy_offs = xy_base + t[:, None] * (H * P) + offs_p[None, :]
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
        tl.store(DQ + dq_base + t[:, None] * (H * N) + offs_n[None, :], dq.to(DQ.dtype.element_ty))
        tl.store(QDQ + scalar_base + t, q_dq)
        k_to_end = (k * (tl.exp(chunk_total - cs) * w)[:, None]).to(k.dtype)
        state = state * tl.exp(chunk_total) + _mm(tl.trans(k_to_end), x, PRECISION, UPCAST)


@triton.jit
def _chunk_dkdx_kernel(
    Cq, Bk, X, DY, ALOG, W, GD, DSTATE_OUT, DK, DX, DW, DG,
    L, H: tl.constexpr, G: tl.constexpr, NUM_CHUNKS, CHUNKS_PER_BLOCK, NUM_BLOCKS,
    N: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dB̄ per head (B, L, H, N), dx (B, L, H, P), dw and dg (B, H, L), walking the block's chunks backward.

    DSTATE_OUT (B, H, NUM_BLOCKS, N, P): ``Σ_{t > block end} e^{cs_t - cs_end} C̄_t dy_tᵀ``.
    """
    pid_block = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // H
    head = pid_bh % H
    group = head // (H // G)
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, N)
    offs_p = tl.arange(0, P)
    qk_base = batch * L * G * N + group * N
    xy_base = batch * L * H * P + head * P
    dk_base = batch * L * H * N + head * N
    scalar_base = pid_bh * L
    above = offs_t[None, :] > offs_t[:, None]  # [s, t]: t > s
    diagonal = offs_t[:, None] == offs_t[None, :]
    dstate_ptr = DSTATE_OUT + (pid_bh * NUM_BLOCKS + pid_block) * (N * P) + offs_n[:, None] * P + offs_p[None, :]
    dstate = tl.load(dstate_ptr)
    first = pid_block * CHUNKS_PER_BLOCK
    last = tl.minimum(first + CHUNKS_PER_BLOCK, NUM_CHUNKS)
    for step in range(0, last - first):
        chunk = last - 1 - step
        t = chunk * CHUNK + offs_t
        a_log = tl.load(ALOG + scalar_base + t)
        w = tl.load(W + scalar_base + t)
        g = tl.load(GD + scalar_base + t)
        cs = tl.cumsum(a_log, axis=0)
        chunk_total = tl.sum(a_log, axis=0)
        qk_offs = qk_base + t[:, None] * (G * N) + offs_n[None, :]
        q = tl.load(Cq + qk_offs)
        k = tl.load(Bk + qk_offs)
        xy_offs = xy_base + t[:, None] * (H * P) + offs_p[None, :]
        x = tl.load(X + xy_offs)
        dy = tl.load(DY + xy_offs)
        to_end = tl.exp(chunk_total - cs)
        dk_raw = _mm(x, tl.trans(dstate).to(x.dtype), PRECISION, UPCAST) * to_end[:, None]
        dx = _mm(k, dstate.to(k.dtype), PRECISION, UPCAST) * (to_end * w)[:, None]
        k_q = _mm(k, tl.trans(q), PRECISION, UPCAST)  # [s, t] = B̄_s · C̄_t
        x_dy = _mm(x, tl.trans(dy), PRECISION, UPCAST)  # [s, t] = x_s · dy_t
        decay = tl.where(above, tl.exp(tl.minimum(cs[None, :] - cs[:, None], 0.0)), 0.0)
        weight = decay * w[:, None] + tl.where(diagonal, g[:, None], 0.0)
        dx += _mm((k_q * weight).to(dy.dtype), dy, PRECISION, UPCAST)
        dk_raw += _mm((x_dy * decay).to(q.dtype), q, PRECISION, UPCAST)
        diag_qk = tl.sum(tl.where(diagonal, k_q, 0.0), axis=1)
        diag_xdy = tl.sum(tl.where(diagonal, x_dy, 0.0), axis=1)
        dw = tl.sum(dk_raw * k.to(tl.float32), axis=1)
        dk = dk_raw * w[:, None] + (g * diag_xdy)[:, None] * q.to(tl.float32)
        tl.store(DK + dk_base + t[:, None] * (H * N) + offs_n[None, :], dk.to(DK.dtype.element_ty))
        tl.store(DX + xy_offs, dx.to(DX.dtype.element_ty))
        tl.store(DW + scalar_base + t, dw)
        tl.store(DG + scalar_base + t, diag_qk * diag_xdy)
        q_from_start = (q * tl.exp(cs)[:, None]).to(q.dtype)
        dstate = dstate * tl.exp(chunk_total) + _mm(tl.trans(q_from_start), dy, PRECISION, UPCAST)


def _num_blocks(num_chunks: int, batch_heads: int, target_programs: int) -> tuple[int, int]:
    """-> (chunks per block, number of blocks) giving about ``target_programs`` programs over (blocks, batch*heads)."""
    wanted = max(1, min(num_chunks, -(-target_programs // batch_heads)))
    per_block = -(-num_chunks // wanted)
    return per_block, -(-num_chunks // per_block)


class _Mamba3ScanCore(torch.autograd.Function):
    """y = quadratic form of (C̄, B̄, x, log-decay, w, g); see the module docstring. Inputs as in ``_launch``."""

    @staticmethod
    def forward(ctx, q, k, x, a_log, w, g, chunk_size, target_programs, num_warps, bwd_num_warps):
        batch, length, heads, headdim = x.shape
        groups, state_dim = q.shape[2], q.shape[3]
        num_chunks = length // chunk_size
        per_block, num_blocks = _num_blocks(num_chunks, batch * heads, target_programs)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        dims = dict(L=length, H=heads, G=groups, NUM_CHUNKS=num_chunks, CHUNKS_PER_BLOCK=per_block,
                    NUM_BLOCKS=num_blocks, N=state_dim, P=headdim, CHUNK=chunk_size, PRECISION=precision,
                    UPCAST=_INTERPRETED)
        grid = (num_blocks, batch * heads)
        state_in = torch.empty(batch, heads, num_blocks, state_dim, headdim, device=x.device, dtype=torch.float32)
        if num_blocks > 1:
            block_decay = torch.empty(batch, heads, num_blocks, device=x.device, dtype=torch.float32)
            _block_state_kernel[grid](k, x, a_log, w, state_in, block_decay, REVERSE=False, num_warps=num_warps, **dims)
            _scan_blocks(state_in, block_decay, reverse=False)
        else:
            state_in.zero_()
        y = torch.empty_like(x)
        _chunk_forward_kernel[grid](q, k, x, a_log, w, g, state_in, y, num_warps=num_warps, **dims)
        ctx.save_for_backward(q, k, x, a_log, w, g, state_in)
        ctx.launch = (grid, dims, bwd_num_warps)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, x, a_log, w, g, state_in = ctx.saved_tensors
        grid, dims, bwd_warps = ctx.launch
        dy = dy.contiguous().to(x.dtype)
        batch, length, heads, headdim = x.shape
        groups, state_dim, num_blocks = q.shape[2], q.shape[3], dims["NUM_BLOCKS"]
        dstate_out = torch.empty_like(state_in)
        if num_blocks > 1:
            block_decay = torch.empty(batch, heads, num_blocks, device=x.device, dtype=torch.float32)
            _block_state_kernel[grid](q, dy, a_log, w, dstate_out, block_decay, REVERSE=True, num_warps=bwd_warps,
                                      **dims)
            _scan_blocks(dstate_out, block_decay, reverse=True)
        else:
            dstate_out.zero_()
        grad_dtype = q.dtype if groups == heads else torch.float32
        dq = torch.empty(batch, length, heads, state_dim, device=x.device, dtype=grad_dtype)
        dk = torch.empty_like(dq)
        dx = torch.empty_like(x)
        q_dq, dw, dg = (torch.empty_like(a_log) for _ in range(3))
        _chunk_dq_kernel[grid](q, k, x, dy, a_log, w, g, state_in, dq, q_dq, num_warps=bwd_warps, **dims)
        _chunk_dkdx_kernel[grid](q, k, x, dy, a_log, w, g, dstate_out, dk, dx, dw, dg, num_warps=bwd_warps, **dims)
        d_cs = q_dq - w * dw
        d_alog = torch.flip(torch.cumsum(torch.flip(d_cs, (-1,)), -1), (-1,))
        if groups != heads:
            dq = dq.unflatten(2, (groups, heads // groups)).sum(3).to(q.dtype)
            dk = dk.unflatten(2, (groups, heads // groups)).sum(3).to(k.dtype)
        return dq, dk, dx, d_alog, dw, dg, None, None, None, None


def _scan_blocks(state: torch.Tensor, block_decay: torch.Tensor, reverse: bool) -> None:
    """In place: state (B, H, NUM_BLOCKS, N, P) local block sums -> states entering each block (see kernel)."""
    batch, heads, num_blocks, state_dim, headdim = state.shape
    size = state_dim * headdim
    tile = min(1024, size)
    _block_scan_kernel[(batch * heads, triton.cdiv(size, tile))](
        state, block_decay, num_blocks, SIZE=size, TILE=tile, REVERSE=reverse
    )


def _check_shapes(x, dt, Bm, Cm, chunk_size):
    batch, length, heads, headdim = x.shape
    if dt.shape != (batch, length, heads):
        raise ValueError(f"mamba3_scan: dt has shape {tuple(dt.shape)} (expected {(batch, length, heads)})")
    if Bm.shape != Cm.shape or Bm.dim() != 4 or Bm.shape[:2] != (batch, length) or heads % Bm.shape[2]:
        raise ValueError(
            f"mamba3_scan: Bm {tuple(Bm.shape)} / Cm {tuple(Cm.shape)} must both be (B, L, G, N) with G dividing "
            f"H={heads}"
        )
    for name, size in (("headdim", headdim), ("d_state", Bm.shape[3]), ("chunk_size", chunk_size)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"mamba3_scan (Triton): {name}={size} must be a power of two >= 16")


def mamba3_scan(x, dt, A, lam, Bm, Cm, D=None, chunk_size: int = 32, target_programs: int = 1024, num_warps: int = 4,
                bwd_num_warps: int = 8):
    """Mamba-3 SISO scan on CUDA (or under TRITON_INTERPRET=1 on CPU). Shapes in the module docstring.

    ``num_warps`` / ``bwd_num_warps``: warps per program of the forward / backward kernels.
    ``target_programs`` sets how many (block, batch*head) programs to aim for (the sequence is cut into that many
    blocks when batch*heads is small). Returns y (B, L, H, P) in x's dtype.
    """
    _check_shapes(x, dt, Bm, Cm, chunk_size)
    length = x.shape[1]
    g, w = trapezoid_weights(dt.float(), lam.float())
    a_log = dt.float() * A.float()
    Cq, Bk = Cm.to(x.dtype), Bm.to(x.dtype)
    pad = (-length) % chunk_size
    xs = x
    if pad:
        pad_tokens = (0, 0, 0, 0, 0, pad)
        xs, Cq, Bk = (torch.nn.functional.pad(v, pad_tokens) for v in (x, Cq, Bk))
        a_log, w, g = (torch.nn.functional.pad(v, (0, 0, 0, pad)) for v in (a_log, w, g))
    scalars = [v.transpose(1, 2).contiguous() for v in (a_log, w, g)]  # (B, H, L)
    y = _Mamba3ScanCore.apply(Cq.contiguous(), Bk.contiguous(), xs.contiguous(), *scalars, chunk_size,
                              target_programs, num_warps, bwd_num_warps)
    y = y[:, :length]
    if D is not None:
        y = y + (D[:, None] * x).to(y.dtype)
    return y
