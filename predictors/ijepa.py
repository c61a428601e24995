"""The JEPA predictor: a narrow sequence model that turns context tokens plus mask tokens placed at target
positions into predictions of the target encoder's features there."""
from __future__ import annotations

import torch
import torch.nn as nn

from encoders.pos_embed import sincos_table
from encoders.vit import gather_tokens, init_vit_weights

from .backbones import build_backbone


class JEPAPredictor(nn.Module):
    """forward(context (B, Nc, D), context_idx (B, Nc), context_pad (B, Nc) | None, target_idx (B, n, Nt),
    grid_size (H, W) or (T, H, W)) -> predictions (B, n, Nt, D_out); indices are flat positions on that token grid.

    Each of the ``n`` target blocks is predicted in its own sequence ``[context, mask tokens of the block]``
    (batch B*n), as in I-JEPA; padding context tokens are masked out of attention / state.

    ``out_dim``: the width of the predictions (default ``embed_dim``; ``embed_dim * k`` for targets of k
    concatenated encoder layers). ``context_head``: a second output projection ``context_proj`` for the context
    tokens' own outputs (V-JEPA 2.1's context loss); ``forward(..., return_context=True)`` then also returns the
    predictions at the context positions, (B, n, Nc, D_out), one per target sequence. Without it the module, its
    parameters and the default forward are exactly as before.
    """

    def __init__(self, embed_dim: int, pred_dim: int = 384, depth: int = 6, num_heads: int = 12,
                 mlp_ratio: float = 4.0, backbone: str = "transformer", out_dim: int | None = None,
                 context_head: bool = False, **backbone_kwargs):
        super().__init__()
        self.pred_dim = pred_dim
        out_dim = out_dim or embed_dim
        self.embed = nn.Linear(embed_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.backbone = build_backbone(backbone, dim=pred_dim, depth=depth, num_heads=num_heads,
                                       mlp_ratio=mlp_ratio, **backbone_kwargs)
        self.norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.proj = nn.Linear(pred_dim, out_dim)
        if backbone == "transformer":
            init_vit_weights(self.backbone)
        for module in (self.embed, self.proj):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if context_head:  # created last: without it the initialisation draws exactly the same numbers
            self.context_proj = nn.Linear(pred_dim, out_dim)
            nn.init.trunc_normal_(self.context_proj.weight, std=0.02)
            nn.init.zeros_(self.context_proj.bias)

    def pos_table(self, grid_size: tuple[int, ...], device, dtype) -> torch.Tensor:
        """(1, prod(grid), pred_dim) fixed sin-cos positions (any grid rank)."""
        return sincos_table(self.pred_dim, grid_size, device, dtype).unsqueeze(0)

    def forward(self, context, context_idx, context_pad, target_idx, grid_size, target_pad=None,
                return_context: bool = False):
        """``target_pad`` (B, n, Nt) bool | None: padding among ragged target sets (V-JEPA's block unions); padded
        queries attend like real ones but no real token attends to them; their outputs are meaningless.
        ``return_context`` (needs ``context_head``): -> (predictions (B, n, Nt, D_out), context predictions
        (B, n, Nc, D_out)): the backbone's outputs at the context positions of each target sequence through the
        shared final norm and ``context_proj``; those of padding context tokens are meaningless."""
        batch, num_targets, target_len = target_idx.shape
        ctx = self.embed(context)
        table = self.pos_table(grid_size, ctx.device, ctx.dtype).expand(batch, -1, -1)
        ctx = ctx + gather_tokens(table, context_idx)
        targets_flat = target_idx.reshape(batch, num_targets * target_len)
        queries = self.mask_token.to(ctx.dtype) + gather_tokens(table, targets_flat)

        # one sequence per (image, target block): (B*n, Nc + Nt, Dp)
        ctx = ctx.repeat_interleave(num_targets, dim=0)
        queries = queries.reshape(batch * num_targets, target_len, self.pred_dim)
        x = torch.cat([ctx, queries], dim=1)
        pos = torch.cat([context_idx.repeat_interleave(num_targets, 0), target_idx.reshape(-1, target_len)], 1)
        pad = None
        if context_pad is not None or target_pad is not None:
            if context_pad is None:
                context_pad = torch.zeros_like(context_idx, dtype=torch.bool)
            if target_pad is None:
                target_pad = torch.zeros_like(target_idx, dtype=torch.bool)
            pad = torch.cat([context_pad.repeat_interleave(num_targets, 0),
                             target_pad.reshape(batch * num_targets, target_len)], dim=1)
        x = self.backbone(x, pos, pad)
        out = self.proj(self.norm(x[:, -target_len:]))
        out = out.reshape(batch, num_targets, target_len, -1)
        if not return_context:
            return out
        if not hasattr(self, "context_proj"):
            raise ValueError("JEPAPredictor: return_context=True needs a predictor built with context_head=True")
        context_len = context_idx.shape[1]
        context_out = self.context_proj(self.norm(x[:, :context_len]))
        return out, context_out.reshape(batch, num_targets, context_len, -1)
