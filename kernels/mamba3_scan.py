"""Mamba-3 scan in Triton: chunk-parallel forward and backward (reference: ``kernels/mamba3_scan_ref.py``).

Public op::

    mamba3_scan(x (B, L, H, P), dt (B, L, H), A (B, L, H), lam (B, L, H),
                Bm (B, L, G, N), Cm (B, L, G, N), D (H) | None, chunk_size=32,
                *, B_bias=None, C_bias=None, theta=None, reversed_heads=0, settings=ScanSettings()) -> y (B, L, H, P)

Files: this one holds the op, its autograd Functions and the launches (``ScanSettings``: how it runs, never what it
computes); ``mamba3_scan_fwd.py`` and ``mamba3_scan_bwd.py`` the forward and backward kernels, ``mamba3_scan_common.py``
their shared ``@triton.jit`` helpers; ``mamba3_scan_ref.py`` the plain-PyTorch reference.

Plain form: ``Bm`` and ``Cm`` are ``B̄`` and ``C̄``, already biased and rotated (pass G = H when they are per head).
Fused form (what the layer uses): ``Bm``, ``Cm`` stay per group and unrotated, with per-head biases ``B_bias``,
``C_bias`` (H, N) or (NB, H, N) and rotation inputs ``theta`` (B, L, N / 4): ``B̄_t = R(φ_t) (B_t + bias_h)`` with
the cumulative angle ``φ_t = Σ_{r<=t} Δ_r π tanh(θ_r)`` (per head; angle j rotates the pair (2j, 2j + 1), the second
half of the state is real). φ is each chunk's starting angle (a small (B, H, L / CHUNK, S) tensor from a per-chunk
einsum and cumsum) plus an in-kernel cumulative sum; cos/sin use the hardware approximations after reduction to
[-π, π] (libdevice under the interpreter).

By default B̄, C̄ are formed in one parallel pass before the scan (``_rotate_keys_kernel``, per-head bf16 copies) and
the scan kernels run the plain form; the gradient pass (``_key_grads_kernel``) takes dB̄, dC̄ back through the
rotation, sums them over each group's heads, and gives the angle and bias gradients. ``ScanSettings.inline_rotation``
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
software-pipelined (``ScanSettings.num_stages``). The gradient of the log-decay comes out as
``d cs_t = C̄_t·dC̄_t^{off} - w_t dw_t`` followed by a reverse cumulative sum along the sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from .mamba3_scan_bwd import _chunk_dkdx_kernel, _chunk_dq_kernel, _key_grads_kernel
from .mamba3_scan_common import _INTERPRETED
from .mamba3_scan_fwd import _block_scan_kernel, _block_state_kernel, _chunk_forward_kernel, _rotate_keys_kernel


@dataclass(frozen=True)
class ScanSettings:
    """How ``mamba3_scan`` runs (launches, not results: the output is the same within rounding for every value).
    The defaults are the fastest that ``benchmarks/mamba3.py`` measured on an H100 (see BENCHMARKS.md).

    ``target_programs``: how many (block, batch*head) programs to aim for (the sequence is cut into that many blocks
    when batch*heads is small); ``num_warps`` / ``bwd_num_warps``: warps per program of the forward / backward scan
    kernels; ``num_stages``: software pipelining depth of the chunk loops (1: none); ``split_dkdx``: the dB side and
    the x side of the backward walk run as two launches (``_chunk_dkdx_kernel`` PART 1, 2); ``rotation_num_warps`` /
    ``rotation_bwd_num_warps``: warps of the rotation pass and of its gradient pass, ``rotation_num_stages`` the
    pipelining depth of the latter's loop over heads; ``inline_rotation``: form B̄, C̄ inside the scan kernels instead
    of in the rotation pass (see the module docstring); ``block_scan_tile``: elements of the (N, P) states per program
    of the block scan (more programs: shorter dependent load/store chains); ``long_scan_chunks``: above this many
    chunks the start angles' cumulative sum runs on a transposed copy (see ``mamba3_scan``).
    """

    target_programs: int = 768
    num_warps: int = 4
    bwd_num_warps: int = 4
    num_stages: int = 3
    split_dkdx: bool = True
    rotation_num_warps: int = 4
    rotation_bwd_num_warps: int = 4
    rotation_num_stages: int = 2
    inline_rotation: bool = False
    block_scan_tile: int = 256
    long_scan_chunks: int = 256

def _tile_rows(chunk_size: int) -> int:
    """Rows per program of the rotation passes: a whole number of chunks, at least 64."""
    return chunk_size * max(1, 64 // chunk_size)


class _RotatedKeys(torch.autograd.Function):
    """Per-group B, C (B, L, G, N) -> per-head B̄, C̄ (B, L, H, N) in x's dtype: bias added, rotated by the
    cumulative angles (``_rotate_keys_kernel``); backward: ``_key_grads_kernel``.

    dt (B, H, L) fp32 scan order; pt (B, L, S) fp32 memory order; phi0 (B, H, L / CHUNK, S) fp32 (None, None: no
    rotation); biases (NB, H, N) fp32 or None. Lengths are whole chunks."""

    @staticmethod
    def forward(ctx, Bm, Cm, B_bias, C_bias, dt, pt, phi0, heads, fwd_heads, chunk_size, dtype, settings):
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
            Bm, Cm, *args, B_bar, C_bar, num_warps=settings.rotation_num_warps, **dims)
        ctx.save_for_backward(Bm, Cm, *args)
        ctx.dims, ctx.settings = dims, settings
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
                                              NUM_TILES=num_tiles, STAGES=ctx.settings.rotation_num_stages,
                                              num_warps=ctx.settings.rotation_bwd_num_warps, **dims)
        d_bias = [None, None]
        if has_bias:
            per_bias = (B_bias.shape[0], batch // B_bias.shape[0], num_tiles, heads, state_dim)
            d_bias = [part.view(per_bias).sum((1, 2)) for part in bias_parts]
        if not rotate:
            ddt = dphi0 = dpt = None
        return (dB.to(Bm.dtype), dC.to(Cm.dtype), *d_bias, ddt, dpt, dphi0, None, None, None, None, None)


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
    def forward(ctx, q, k, x, a_log, w, g, dt, pt, phi0, q_bias, k_bias, d_skip, fwd_heads, chunk_size, settings):
        batch, length, heads, headdim = x.shape
        groups, state_dim = q.shape[2], q.shape[3]
        num_chunks = length // chunk_size
        per_block, num_blocks = _num_blocks(num_chunks, batch * heads, settings.target_programs)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        rotate, has_bias, has_d = pt is not None, q_bias is not None, d_skip is not None
        dims = dict(L=length, H=heads, G=groups, H_FWD=fwd_heads, NUM_CHUNKS=num_chunks, CHUNKS_PER_BLOCK=per_block,
                    NUM_BLOCKS=num_blocks, N=state_dim, P=headdim, CHUNK=chunk_size, PRECISION=precision,
                    UPCAST=_INTERPRETED, BATCH_PER_BIAS=batch // q_bias.shape[0] if has_bias else 1,
                    S=state_dim // 4, HAS_BIAS=has_bias, ROTATE=rotate, FAST=not _INTERPRETED,
                    STAGES=settings.num_stages)
        dummy = a_log
        rot_args = (dt, pt, phi0) if rotate else (dummy, dummy, dummy)
        qb, kb = (q_bias, k_bias) if has_bias else (dummy, dummy)
        d_arg = d_skip if has_d else dummy
        grid = (num_blocks, batch * heads)
        state_in = torch.empty(batch, heads, num_blocks, state_dim, headdim, device=x.device, dtype=torch.float32)
        if num_blocks > 1:
            block_decay = torch.empty(batch, heads, num_blocks, device=x.device, dtype=torch.float32)
            _block_state_kernel[grid](k, x, a_log, w, state_in, block_decay, kb, *rot_args, REVERSE=False,
                                      num_warps=settings.num_warps, **dims)
            _scan_blocks(state_in, block_decay, reverse=False, tile=settings.block_scan_tile)
        else:
            state_in.zero_()
        y = torch.empty_like(x)
        _chunk_forward_kernel[grid](q, k, x, a_log, w, g, state_in, y, qb, kb, *rot_args, d_arg, HAS_D=has_d,
                                    num_warps=settings.num_warps, **dims)
        # with one block the incoming states are zeros: made again in backward instead of kept alive until then
        ctx.save_for_backward(q, k, x, a_log, w, g, state_in if num_blocks > 1 else None, *rot_args, qb, kb, d_arg)
        ctx.launch = (grid, dims, settings, has_d)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, x, a_log, w, g, state_in, dt, pt, phi0, qb, kb, d_arg = ctx.saved_tensors
        if state_in is None:
            state_in = torch.zeros(x.shape[0], x.shape[2], 1, q.shape[3], x.shape[3], device=x.device,
                                   dtype=torch.float32)
        grid, dims, settings, has_d = ctx.launch
        bwd_warps = settings.bwd_num_warps
        rotate, has_bias = dims["ROTATE"], dims["HAS_BIAS"]
        dy = dy.contiguous().to(x.dtype)
        batch, length, heads, headdim = x.shape
        groups, state_dim, num_blocks = q.shape[2], q.shape[3], dims["NUM_BLOCKS"]
        dstate_out = torch.empty_like(state_in)
        if num_blocks > 1:
            block_decay = torch.empty(batch, heads, num_blocks, device=x.device, dtype=torch.float32)
            _block_state_kernel[grid](q, dy, a_log, w, dstate_out, block_decay, qb, dt, pt, phi0, REVERSE=True,
                                      num_warps=bwd_warps, **dims)
            _scan_blocks(dstate_out, block_decay, reverse=True, tile=settings.block_scan_tile)
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
        for part in (1, 2) if settings.split_dkdx else (0,):
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


def _scan_blocks(state: torch.Tensor, block_decay: torch.Tensor, reverse: bool, tile: int) -> None:
    """In place: state (B, H, NUM_BLOCKS, N, P) local block sums -> states entering each block (see kernel); ``tile``
    elements of the states per program."""
    batch, heads, num_blocks, state_dim, headdim = state.shape
    size = state_dim * headdim
    tile = min(tile, size)
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


def _scan_order(v: torch.Tensor, fwd_heads: int) -> torch.Tensor:
    """(B, H, L) -> each head's scan order: heads >= fwd_heads reversed along L."""
    if fwd_heads == v.shape[1]:
        return v
    return torch.cat((v[:, :fwd_heads], v[:, fwd_heads:].flip(-1)), dim=1)


def mamba3_scan(x, dt, A, lam, Bm, Cm, D=None, chunk_size: int = 32, *, B_bias=None, C_bias=None, theta=None,
                reversed_heads: int = 0, settings: ScanSettings = ScanSettings()):
    """Mamba-3 SISO scan on CUDA (or under TRITON_INTERPRET=1 on CPU). Shapes in the module docstring.

    Without ``B_bias``, ``C_bias`` and ``theta``, Bm and Cm are B̄ and C̄ as they are. With them (fused path) Bm and Cm
    are per group and unrotated, and the kernels form ``B̄ = R(φ) (Bm + B_bias)`` per head on the fly:
    B_bias, C_bias (H, N) or (NB, H, N) (batch row b uses row b // (B / NB); both or neither), theta (B, L, S) with
    ``S = N / 4`` rotates pairs (2j, 2j+1), j < S, by ``φ_t = Σ_{r<=t} Δ_r π tanh(θ_r)`` (``cumulative_angles``).
    B̄, C̄ are formed in one parallel pass before the scan (``_rotate_keys_kernel``; its backward
    ``_key_grads_kernel`` takes the per-head gradients back through the rotation and sums them over the heads), or
    with ``settings.inline_rotation`` inside the scan kernels (per chunk, in every kernel that reads them). The
    separate pass is the default: it keeps the rotation out of the scan's sequential chunk loop (see BENCHMARKS.md).
    ``reversed_heads``: the last that many heads scan the sequence right to left (their outputs are those of the
    reference run on the flipped sequence, flipped back), in the same launch as the left-to-right heads.
    ``settings``: the launches (``ScanSettings``). Returns y (B, L, H, P) in x's dtype.
    """
    _check_shapes(x, dt, Bm, Cm, chunk_size, reversed_heads)
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
            if num_chunks > settings.long_scan_chunks:
                phi0 = (torch.cumsum(chunk_turn.transpose(2, 3), dim=-1) - chunk_turn.transpose(2, 3)).transpose(2, 3)
            else:
                phi0 = torch.cumsum(chunk_turn, dim=2) - chunk_turn
            phi0 = phi0.contiguous()
    if pad:
        pad_tokens = (0, 0, 0, 0, 0, pad)
        xs, Cq, Bk = (F.pad(v, pad_tokens) for v in (x, Cq, Bk))
    d_skip = None if D is None else D.float()
    if (B_bias is not None or pt is not None) and not settings.inline_rotation:
        # B̄, C̄ per head from one parallel pass (and their gradients from one more), then the plain scan
        Bk, Cq = _RotatedKeys.apply(Bk.contiguous(), Cq.contiguous(), B_bias, C_bias, dt_s, pt, phi0, heads,
                                    fwd_heads, chunk_size, x.dtype, settings)
        B_bias = C_bias = pt = phi0 = None
    y = _Mamba3ScanCore.apply(Cq.contiguous(), Bk.contiguous(), xs.contiguous(), a_log, w, g, dt_s, pt, phi0, C_bias,
                              B_bias, d_skip, fwd_heads, chunk_size, settings)
    return y[:, :length]
