"""The VL-JEPA predictor: visual tokens and a text query in, a prediction of the Y-encoder's embedding out."""
from __future__ import annotations

import torch
import torch.nn as nn

from encoders.vit import init_vit_weights

from .backbones import build_backbone

_QUERY_EMBEDDINGS = ("learned", "y_encoder")


class VLPredictor(nn.Module):
    """VL-JEPA predictor (Chen et al. 2025, arXiv 2512.10942): visual tokens ⊕ query tokens -> backbone ->
    mean over non-padding tokens -> linear map into the Y-encoder's embedding space.

    forward(x_tokens (B, N, x_dim), query_ids (B, Lq) long | None, query_mask (B, Lq) | None,
    query_embeds (B, Lq, query_dim) | None) -> (B, y_dim).

    - ``x_tokens``: the X-encoder's tokens (their positions are already inside them), mapped by ``x_proj``.
    - ``query_embedding="learned"``: the predictor embeds ``query_ids`` itself (``query_embed``, vocab_size rows) and
      adds learned positions (``query_pos``, at most ``max_query_len`` tokens); ``"y_encoder"``: the caller passes the
      Y-encoder's input token embeddings (``token_embeddings``: positions included) as ``query_embeds`` and
      ``query_proj`` maps them from ``query_dim`` (required in this mode, unused otherwise); ``query_ids``, the
      tokens they embed, may come along (only their shape is checked).
    - ``query_mask``: 1 (or True) at real tokens, 0 at padding (the HF ``attention_mask``); None: no padding.
    - A learned modality embedding (row 0 visual, row 1 query) is added to each token.
    - ``use_query=False``: visual tokens only (the "no query" baseline); no query parameters exist and every query
      argument must be None.
    The sequence is ``[visual tokens (raster order), query tokens]`` with ``pos = arange(N + Lq)``, so an
    order-aware backbone (``mamba3``) scans the image first, then the text. ``backbone_options`` go to
    ``build_backbone`` (e.g. ``causal``, ``norm``, ``norm_eps`` for ``transformer``; ``d_state``... for ``mamba3``).
    """

    def __init__(self, x_dim: int, y_dim: int, dim: int = 384, depth: int = 6, num_heads: int = 12,
                 mlp_ratio: float = 4.0, backbone: str = "transformer", query_embedding: str = "learned",
                 vocab_size: int = 30522, max_query_len: int = 64, query_dim: int | None = None,
                 use_query: bool = True, **backbone_options):
        super().__init__()
        if query_embedding not in _QUERY_EMBEDDINGS:
            raise ValueError(f"predictor query_embedding '{query_embedding}' is unknown "
                             f"(expected one of {list(_QUERY_EMBEDDINGS)})")
        if use_query and query_embedding == "y_encoder" and (query_dim is None or query_dim <= 0):
            raise ValueError(f"predictor query_embedding 'y_encoder' needs query_dim, the width of the Y-encoder's "
                             f"token embeddings (got {query_dim})")
        if use_query and query_embedding == "learned" and (vocab_size <= 0 or max_query_len <= 0):
            raise ValueError(f"predictor query_embedding 'learned' needs vocab_size > 0 and max_query_len > 0 "
                             f"(got vocab_size={vocab_size}, max_query_len={max_query_len})")
        self.x_dim, self.y_dim, self.dim = x_dim, y_dim, dim
        self.depth, self.num_heads, self.mlp_ratio, self.backbone_name = depth, num_heads, mlp_ratio, backbone
        self.use_query, self.query_embedding = use_query, query_embedding
        self.max_query_len, self.query_dim = max_query_len, query_dim

        self.x_proj = nn.Linear(x_dim, dim)
        if use_query and query_embedding == "learned":
            self.query_embed = nn.Embedding(vocab_size, dim)
            self.query_pos = nn.Parameter(torch.zeros(1, max_query_len, dim))
        elif use_query:
            self.query_proj = nn.Linear(query_dim, dim)
        # only the modalities that occur: a parameter that never gets a gradient breaks DDP
        self.modality_embed = nn.Parameter(torch.zeros(2 if use_query else 1, dim))
        self.backbone = build_backbone(backbone, dim, depth, num_heads, mlp_ratio=mlp_ratio, **backbone_options)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.y_proj = nn.Linear(dim, y_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.backbone_name == "transformer":
            init_vit_weights(self.backbone)
        for module in (self.x_proj, getattr(self, "query_proj", None), self.y_proj):
            if module is not None:
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for param in (getattr(self, "query_embed", None), getattr(self, "query_pos", None), self.modality_embed):
            if param is not None:
                nn.init.trunc_normal_(param.weight if isinstance(param, nn.Embedding) else param, std=0.02)

    def forward(self, x_tokens: torch.Tensor, query_ids: torch.Tensor | None, query_mask: torch.Tensor | None,
                query_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """-> (B, y_dim): the predicted Y embedding (not normalised)."""
        query_len = self._check_inputs(x_tokens, query_ids, query_mask, query_embeds)
        batch, num_visual, _ = x_tokens.shape
        visual = self.x_proj(x_tokens)
        tokens = visual + self.modality_embed[0].to(visual.dtype)
        padding = None
        if self.use_query:
            query = self._embed_query(query_ids, query_embeds, query_len)
            tokens = torch.cat([tokens, query + self.modality_embed[1].to(query.dtype)], dim=1)
            if query_mask is not None:
                visual_pad = torch.zeros(batch, num_visual, dtype=torch.bool, device=x_tokens.device)
                padding = torch.cat([visual_pad, query_mask == 0], dim=1)
        length = tokens.shape[1]
        pos = torch.arange(length, device=tokens.device).expand(batch, length)
        hidden = self.norm(self.backbone(tokens, pos, padding))
        if padding is None:
            pooled = hidden.mean(dim=1)
        else:  # masked_fill, not a product: a padding row may hold anything (even non-finite values)
            keep = (~padding).sum(dim=1, keepdim=True).to(hidden.dtype)
            pooled = hidden.masked_fill(padding[..., None], 0.0).sum(dim=1) / keep
        return self.y_proj(pooled)

    def _embed_query(self, query_ids, query_embeds, query_len: int) -> torch.Tensor:
        """-> (B, Lq, dim)."""
        if self.query_embedding == "learned":
            return self.query_embed(query_ids) + self.query_pos[:, :query_len].to(self.query_embed.weight.dtype)
        return self.query_proj(query_embeds)

    def _check_inputs(self, x_tokens, query_ids, query_mask, query_embeds) -> int:
        """Shape checks (no device sync); -> the query length Lq (0 without query)."""
        if x_tokens.dim() != 3 or x_tokens.shape[-1] != self.x_dim or x_tokens.shape[1] == 0:
            raise ValueError(f"VLPredictor x_tokens has shape {tuple(x_tokens.shape)} (expected (B, N, x_dim) with "
                             f"N >= 1 and x_dim = {self.x_dim})")
        batch = x_tokens.shape[0]
        if not self.use_query:
            given = [name for name, value in (("query_ids", query_ids), ("query_mask", query_mask),
                                              ("query_embeds", query_embeds)) if value is not None]
            if given:
                raise ValueError(f"VLPredictor was built with use_query=False but got {', '.join(given)} "
                                 f"(expected None)")
            return 0
        if self.query_embedding == "learned":
            if query_embeds is not None:
                raise ValueError("VLPredictor with query_embedding 'learned' embeds query_ids itself; got "
                                 "query_embeds (expected None)")
            if query_ids is None or query_ids.dim() != 2 or query_ids.shape[0] != batch:
                shape = None if query_ids is None else tuple(query_ids.shape)
                raise ValueError(f"VLPredictor query_ids has shape {shape} (expected (B, Lq) with B = {batch})")
            query_len = query_ids.shape[1]
            if query_len > self.max_query_len:
                raise ValueError(f"VLPredictor query has {query_len} tokens, longer than max_query_len "
                                 f"{self.max_query_len} (shorten the query or raise max_query_len)")
        else:
            if query_embeds is None or query_embeds.dim() != 3 or query_embeds.shape[0] != batch \
                    or query_embeds.shape[-1] != self.query_dim:
                shape = None if query_embeds is None else tuple(query_embeds.shape)
                raise ValueError(f"VLPredictor query_embeds has shape {shape} (expected (B, Lq, query_dim) with "
                                 f"B = {batch} and query_dim = {self.query_dim})")
            query_len = query_embeds.shape[1]
            if query_ids is not None and tuple(query_ids.shape) != (batch, query_len):
                raise ValueError(f"VLPredictor query_ids has shape {tuple(query_ids.shape)} but query_embeds has "
                                 f"{tuple(query_embeds.shape)} (expected ids (B, Lq) = {(batch, query_len)})")
        if query_mask is not None and tuple(query_mask.shape) != (batch, query_len):
            raise ValueError(f"VLPredictor query_mask has shape {tuple(query_mask.shape)} (expected (B, Lq) = "
                             f"{(batch, query_len)}, matching the query)")
        return query_len
