"""Bidirectional, padding-aware Mamba-3 backbone (Lahoti et al., ICLR 2026, arXiv 2603.15569).

Tokens arrive in any order (context tokens, then mask tokens). The backbone sorts them by their flat grid position
``pos`` (padding last), runs every block in that raster / space-time order, and scatters the outputs back to the input
order. Each mixer scans the sorted sequence in both directions (see ``bidirectional`` below). Padding tokens get
Δ = 0 and x = 0, so they change no state: real-token outputs are the same with or without padding.

Mixer (``Mamba3Mixer``), per token, from one bias-free ``in_proj``: gate z and value x (H heads × P), and per direction
key B and query C (G groups × R ranks × N), Δ, A and λ inputs (H each) and rotation inputs θ (N // 4). Then
``Δ = softplus(· + dt_bias)``, ``A = -max(softplus(· [+ A_bias]), 1e-4)`` (``A_bias`` only with ``a_init``: a
learnable per-head offset starting at softplus⁻¹(a_init), for tasks whose state must not decay), ``λ = sigmoid(·)``,
B and C go through RMSNorm and get per-head biases (init 1), and are rotated by cumulative angles
``φ_t = φ_{t-1} + Δ_t π tanh(θ_t)`` (see ``kernels/mamba3_scan_ref.py`` for the recurrence and the pairing
convention). Default (``bidirectional="split"``): half of the heads scan left to right and half right to left, in
one scan call, ``y = (scan + D x) · silu(z)``; ``separate`` / ``shared``: every head scans both ways,
``y = (scan_fwd + scan_bwd + D x) · silu(z)``; then ``out_proj``. The scan (``kernel``): with ``"auto"`` on CUDA
(SISO) it is the Triton op (``kernels/mamba3_scan.py``): B and C stay per group and the op applies the per-head bias,
the angle cumsum and the rotation itself; elsewhere (and for MIMO) the op's PyTorch reference
(``kernels.mamba3_scan_ref.scan_fused_ref``) does the same in plain PyTorch. ``"triton"`` runs the Triton op on any
device (on CPU tensors under ``TRITON_INTERPRET=1``: the tests), ``"reference"`` always the PyTorch path.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

from encoders.layers import drop_path_rates
from kernels.mamba3_scan_ref import scan_fused_ref

from . import register_backbone

_DIRECTIONS = {"forward": 1, "shared": 1, "separate": 2, "split": 1}
_KERNELS = ("auto", "triton", "reference")


class Mamba3Mixer(nn.Module):
    """Mamba-3 sequence mixer on a sorted sequence.

    forward(u (B, L, D), padding (B, L) bool True at padding | None) -> (B, L, D).
    ``bidirectional``: ``"separate"`` (the reversed scan has its own B, C, Δ, A, λ, θ projections and biases),
    ``"shared"`` (both scans use the same ones: reversing the sequence reverses the output), ``"split"`` (half of
    the heads scan left to right, the other half right to left, in one scan of the sequence's cost: the out_proj
    mixes both halves, so every output sees the whole sequence), ``"forward"`` (causal).
    ``kernel``: ``"auto"`` (the Triton op on CUDA for SISO and sizes it takes, else the PyTorch reference),
    ``"triton"`` (the Triton op on any device; SISO and powers of two >= 16 only) or ``"reference"``;
    ``scan_settings``: the Triton op's launches (``kernels.mamba3_scan.ScanSettings``; None: its defaults).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 128,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        mimo_rank: int = 1,
        use_rotation: bool = True,
        bidirectional: str = "split",
        chunk_size: int = 32,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        a_floor: float = 1e-4,
        a_init: float | None = None,
        kernel: str = "auto",
        scan_settings=None,
    ):
        super().__init__()
        inner = int(expand * dim)
        if headdim <= 0 or inner % headdim:
            raise ValueError(f"mamba3 headdim {headdim} does not divide expand*dim = {expand}*{dim} = {inner}")
        heads = inner // headdim
        if ngroups <= 0 or heads % ngroups:
            raise ValueError(f"mamba3 ngroups {ngroups} does not divide the number of heads {heads}")
        if d_state < 4 or d_state % 4:
            raise ValueError(f"mamba3 d_state {d_state} must be a positive multiple of 4 (half of it is rotated)")
        if mimo_rank < 1:
            raise ValueError(f"mamba3 mimo_rank {mimo_rank} must be >= 1")
        if bidirectional not in _DIRECTIONS:
            raise ValueError(f"mamba3 bidirectional '{bidirectional}' is unknown (expected one of {list(_DIRECTIONS)})")
        if bidirectional == "split" and heads % 2:
            raise ValueError(f"mamba3 bidirectional 'split' needs an even number of heads (expand*dim/headdim = {heads})")
        if kernel not in _KERNELS:
            raise ValueError(f"mamba3 kernel '{kernel}' is unknown (expected one of {list(_KERNELS)})")
        if kernel == "triton":
            from kernels.mamba3_scan import supports  # imports triton

            if mimo_rank != 1 or not supports(d_state, headdim, chunk_size):
                raise ValueError(f"mamba3 kernel 'triton' takes mimo_rank 1 and d_state, headdim, chunk_size powers "
                                 f"of two >= 16 (got mimo_rank={mimo_rank}, d_state={d_state}, headdim={headdim}, "
                                 f"chunk_size={chunk_size}); use kernel 'auto' or 'reference'")
        self.kernel, self.scan_settings = kernel, scan_settings
        self.inner, self.heads, self.headdim, self.d_state = inner, heads, headdim, d_state
        self.groups, self.rank, self.use_rotation = ngroups, mimo_rank, use_rotation
        self.bidirectional, self.chunk_size, self.a_floor = bidirectional, chunk_size, a_floor
        self.num_angles = d_state // 4
        directions = _DIRECTIONS[bidirectional]
        bc = ngroups * mimo_rank * d_state
        self.direction_sizes = [bc, bc, heads, heads, heads, self.num_angles]  # B, C, dt, A, lam, theta
        self.in_proj = nn.Linear(dim, 2 * inner + directions * sum(self.direction_sizes), bias=False)
        dt = torch.exp(torch.rand(directions, heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        if a_init is not None:  # a learnable per-head offset inside A's softplus: |A| starts near a_init
            if a_init <= 0:
                raise ValueError(f"mamba3 a_init {a_init} must be > 0 (the starting |A|) or None")
            self.A_bias = nn.Parameter(torch.full((directions, heads), math.log(math.expm1(a_init))))
        self.B_bias = nn.Parameter(torch.ones(directions, heads, mimo_rank, d_state))
        self.C_bias = nn.Parameter(torch.ones(directions, heads, mimo_rank, d_state))
        self.B_norm = nn.RMSNorm(d_state, eps=1e-5)
        self.C_norm = nn.RMSNorm(d_state, eps=1e-5)
        self.D = nn.Parameter(torch.ones(heads))
        if mimo_rank > 1:
            self.mimo_x = nn.Parameter(torch.full((heads, mimo_rank, headdim), 1.0 / mimo_rank))
            self.mimo_out = nn.Parameter(torch.ones(heads, mimo_rank, headdim))
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def _direction_inputs(self, proj: torch.Tensor, direction: int, padding: torch.Tensor | None, dtype):
        """proj (B, L, sizes) -> dt, A, lam (B, L, H) fp32; Bn, Cn (B, L, G, R, N) RMS-normalised, in ``dtype``;
        theta (B, L, S) rotation inputs or None. Biases and rotation are applied by the scan (fused on CUDA)."""
        batch, length = proj.shape[:2]
        B_in, C_in, dt_in, A_in, lam_in, theta = torch.split(proj, self.direction_sizes, dim=-1)
        dt = F.softplus(dt_in.float() + self.dt_bias[direction])
        if padding is not None:
            dt = dt.masked_fill(padding[..., None], 0.0)
        A_in = A_in.float() + (self.A_bias[direction] if hasattr(self, "A_bias") else 0.0)
        A = -F.softplus(A_in).clamp(min=self.a_floor)
        lam = torch.sigmoid(lam_in.float())
        shape = (batch, length, self.groups, self.rank, self.d_state)
        Bn = self.B_norm(B_in.float().view(shape)).to(dtype)
        Cn = self.C_norm(C_in.float().view(shape)).to(dtype)
        return dt, A, lam, Bn, Cn, (theta if self.use_rotation else None)

    def forward(self, u: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        proj = self.in_proj(u)
        z, x, per_direction = torch.split(proj, [self.inner, self.inner, proj.shape[-1] - 2 * self.inner], dim=-1)
        x = x.unflatten(-1, (self.heads, self.headdim))
        if padding is not None:
            x = x.masked_fill(padding[..., None, None], 0.0)
        if self.bidirectional in ("forward", "split"):
            y = self._scan_heads(x, per_direction, padding)
        else:
            y = self._scan_two_directions(x, per_direction, padding)
        y = y.flatten(2) * F.silu(z)
        return self.out_proj(y)

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether this call runs the Triton op: ``kernel="triton"``, or ``"auto"`` on CUDA for SISO and sizes it
        takes; with ``"auto"`` on CUDA a size it does not take warns once and runs the PyTorch path."""
        if self.kernel != "auto":
            return self.kernel == "triton"
        if not (x.is_cuda and self.rank == 1):
            return False
        from kernels.mamba3_scan import supports  # imports triton; only needed on CUDA

        if supports(self.d_state, self.headdim, self.chunk_size):
            return True
        warnings.warn(f"mamba3: d_state={self.d_state}, headdim={self.headdim}, chunk_size={self.chunk_size} are not "
                      "all powers of two >= 16, so the Triton scan cannot run them; using the (slower) PyTorch path")
        return False

    def _scan(self, x, dt, A, lam, Bn, Cn, B_bias, C_bias, theta, D=None, reversed_heads: int = 0) -> torch.Tensor:
        """One scan call: x (B, L, H, P); Bn, Cn (B, L, G, R, N); B_bias, C_bias (NB, H, R, N) (batch row b uses row
        b // (B / NB)). The Triton op (SISO) or the PyTorch reference; MIMO mixes x into the ranks (``mimo_x``) and
        the ranks' outputs back (``mimo_out``). -> (B, L, H, P), with ``D x`` when D is given."""
        if self.rank == 1:
            Bn, Cn, B_bias, C_bias = Bn.squeeze(3), Cn.squeeze(3), B_bias.squeeze(2), C_bias.squeeze(2)
        if self._fused(x):
            from kernels.mamba3_scan import ScanSettings, mamba3_scan

            settings = self.scan_settings or ScanSettings()
            return mamba3_scan(x, dt, A, lam, Bn, Cn, D, chunk_size=self.chunk_size, B_bias=B_bias, C_bias=C_bias,
                               theta=theta, reversed_heads=reversed_heads, settings=settings)
        xs = x[:, :, :, None, :] * self.mimo_x.to(x.dtype) if self.rank > 1 else x
        y = scan_fused_ref(xs, dt, A, lam, Bn, Cn, None, B_bias, C_bias, theta, self.chunk_size, reversed_heads)
        if self.rank > 1:
            y = (y * self.mimo_out.to(y.dtype)).sum(3)
        return y if D is None else y + D.to(y.dtype)[:, None] * x

    def _scan_heads(self, x, proj, padding) -> torch.Tensor:
        """``forward`` and ``split``: one scan call over the heads (the last half right to left for ``split``), D x
        included. x (B, L, H, P) -> (B, L, H, P)."""
        dt, A, lam, Bn, Cn, theta = self._direction_inputs(proj, 0, padding, x.dtype)
        reversed_heads = self.heads // 2 if self.bidirectional == "split" else 0
        return self._scan(x, dt, A, lam, Bn, Cn, self.B_bias[:1], self.C_bias[:1], theta, self.D, reversed_heads)

    def _scan_two_directions(self, x, per_direction, padding) -> torch.Tensor:
        """``separate`` and ``shared``: every head scans both ways; the reversed stream is the flipped sequence,
        run as extra batch rows of one scan call. x (B, L, H, P) -> (B, L, H, P) (sum of both, plus D x)."""
        batch = x.shape[0]
        if self.bidirectional == "separate":
            forward_proj, backward_proj = per_direction.chunk(2, dim=-1)
        else:
            forward_proj = backward_proj = per_direction
        flip = (lambda v: None if v is None else v.flip(1))
        streams = [(forward_proj, x, padding, 0),
                   (flip(backward_proj), flip(x), flip(padding), 1 if self.bidirectional == "separate" else 0)]
        inputs = [self._direction_inputs(p, d, pad, x.dtype) for p, _, pad, d in streams]
        xs = torch.cat([s[1] for s in streams], dim=0)  # both directions in one scan call: (2B, L, H, P)
        dt, A, lam, Bn, Cn = (torch.cat(parts, dim=0) for parts in list(zip(*inputs))[:5])
        theta = torch.cat([s[5] for s in inputs], dim=0) if self.use_rotation else None
        bias_rows = [d for _, _, _, d in streams]
        y = self._scan(xs, dt, A, lam, Bn, Cn, self.B_bias[bias_rows], self.C_bias[bias_rows], theta)  # (2B, ...)
        y = y[:batch] + y[batch:].flip(1)
        return y + self.D.to(y.dtype)[:, None] * x


class Mamba3Block(nn.Module):
    """Pre-norm block: ``x + drop_path(mixer(norm(x)))`` then ``x + drop_path(mlp(norm(x)))``.

    forward(x (B, L, D) sorted, padding (B, L) bool | None) -> (B, L, D).
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, **mixer_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = Mamba3Mixer(dim, **mixer_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.mixer(self.norm1(x), padding))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def sort_by_position(pos: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, length: int,
                     device) -> torch.Tensor:
    """-> order (B, L) long: token indices sorted by ``pos`` with padding last (stable)."""
    if pos is None:
        pos = torch.arange(length, device=device).expand(batch, length)
    key = pos.long()
    if key_padding_mask is not None:
        key = torch.where(key_padding_mask, key.max() + 1 if key.numel() else 0, key)
    return torch.argsort(key, dim=1, stable=True)


def gather_tokens(v: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """v (B, L, ...) -> v[b, order[b]]."""
    index = order.view(*order.shape, *([1] * (v.dim() - 2))).expand_as(v)
    return torch.gather(v, 1, index)


def scatter_tokens(v: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``gather_tokens``: out[b, order[b, i]] = v[b, i]."""
    index = order.view(*order.shape, *([1] * (v.dim() - 2))).expand_as(v)
    return torch.empty_like(v).scatter(1, index, v)


class SortedBackbone(nn.Module):
    """Runs ``blocks`` (each ``block(x, padding)``) on tokens sorted by position, then restores the input order.

    forward(x (B, L, D), pos (B, L) long | None, key_padding_mask (B, L) bool | None) -> (B, L, D).
    """

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, pos=None, key_padding_mask=None):
        batch, length, _ = x.shape
        order = sort_by_position(pos, key_padding_mask, batch, length, x.device)
        x = gather_tokens(x, order)
        padding = None if key_padding_mask is None else gather_tokens(key_padding_mask, order)
        for block in self.blocks:
            x = block(x, padding)
        if padding is not None:
            x = x.masked_fill(padding[..., None], 0.0)
        return scatter_tokens(x, order)


class Mamba3Backbone(SortedBackbone):
    """``depth`` Mamba-3 blocks (``Mamba3Block``); ``mixer_kwargs`` are ``Mamba3Mixer``'s options."""

    def __init__(self, dim: int, depth: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, **mixer_kwargs):
        super().__init__(
            [Mamba3Block(dim, mlp_ratio, rate, **mixer_kwargs) for rate in drop_path_rates(drop_path, depth)]
        )


@register_backbone("mamba3", options_of=(Mamba3Backbone, Mamba3Mixer))
def mamba3(dim, depth, num_heads, **options):
    """``num_heads`` is unused: heads = expand * dim / headdim."""
    return Mamba3Backbone(dim, depth, **options)
