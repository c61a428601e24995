"""Y-decoder: a small causal transformer LM that turns a Y-space embedding (the text embedding VL-JEPA predicts)
back into tokens.

The (L2-normalised) embedding becomes ``prefix_len`` prefix vectors through one Linear; the prefix and the token
embeddings go through pre-norm timm blocks (SDPA) under one causal mask, so the logits at text position ``t``
depend on the prefix and on tokens ``0..t`` only. The output layer shares its weight with the token embedding.
Sequences start with ``bos`` (MiniLM's BERT vocabulary: [CLS] = 101), end with ``eos`` ([SEP] = 102) and are padded
on the right with ``pad`` (0); right padding never leaks into real positions because of the causal mask.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from encoders.vit import init_vit_weights


class YDecoder(nn.Module):
    """Tiny causal transformer LM conditioned on a Y-space embedding as prefix tokens.

    forward(embedding (B, y_dim), input_ids (B, L)) -> logits (B, L, vocab_size); logits[:, t] predict token t+1.
    """

    def __init__(self, y_dim: int, vocab_size: int, dim: int = 256, depth: int = 4, num_heads: int = 4,
                 max_len: int = 40, prefix_len: int = 4, bos_id: int = 101, eos_id: int = 102, pad_id: int = 0):
        super().__init__()
        for name, value in (("y_dim", y_dim), ("vocab_size", vocab_size), ("dim", dim), ("depth", depth),
                            ("num_heads", num_heads), ("prefix_len", prefix_len)):
            if value < 1:
                raise ValueError(f"YDecoder {name}={value} (expected >= 1)")
        if max_len < 2:
            raise ValueError(f"YDecoder max_len={max_len} (expected >= 2: bos and at least one token)")
        if dim % num_heads:
            raise ValueError(f"YDecoder dim={dim} is not a multiple of num_heads={num_heads}")
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if not 0 <= value < vocab_size:
                raise ValueError(f"YDecoder {name}={value} is outside the vocabulary [0, {vocab_size})")
        self.y_dim, self.vocab_size, self.dim = y_dim, vocab_size, dim
        self.max_len, self.prefix_len = max_len, prefix_len
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

        self.prefix = nn.Linear(y_dim, prefix_len * dim)
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix_len + max_len, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        init_vit_weights(self)
        self.head.weight = self.token_embed.weight  # tied after init: one (vocab, dim) matrix
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, embedding: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """embedding (B, y_dim), input_ids (B, L) with L <= max_len -> logits (B, L, vocab_size)."""
        if embedding.ndim != 2 or embedding.shape[1] != self.y_dim:
            raise ValueError(f"YDecoder embedding has shape {tuple(embedding.shape)} (expected (B, {self.y_dim}))")
        if input_ids.ndim != 2 or input_ids.shape[0] != embedding.shape[0]:
            raise ValueError(f"YDecoder input_ids has shape {tuple(input_ids.shape)} "
                             f"(expected ({embedding.shape[0]}, L))")
        length = input_ids.shape[1]
        if not 1 <= length <= self.max_len:
            raise ValueError(f"YDecoder input_ids length {length} is outside [1, max_len={self.max_len}]")
        prefix = self.prefix(embedding.to(self.prefix.weight.dtype)).view(-1, self.prefix_len, self.dim)
        x = torch.cat([prefix, self.token_embed(input_ids)], dim=1)
        total = self.prefix_len + length
        x = x + self.pos_embed[:, :total]
        causal = torch.ones(total, total, dtype=torch.bool, device=x.device).tril()  # True: may attend
        for block in self.blocks:
            x = block(x, attn_mask=causal)
        return self.head(self.norm(x[:, self.prefix_len:]))

    def loss(self, embedding: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token cross-entropy, averaged over the real (attention_mask = 1) target tokens.

        embedding (B, y_dim), input_ids (B, L) right-padded, attention_mask (B, L) -> 0-d loss.
        """
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] < 2:
            raise ValueError(f"input_ids length {input_ids.shape[1]} (expected >= 2: bos and a target token)")
        logits = self(embedding, input_ids[:, :-1]).float()
        targets = input_ids[:, 1:]
        valid = attention_mask[:, 1:].to(logits.dtype)
        per_token = F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1), reduction="none")
        return (per_token * valid.reshape(-1)).sum() / valid.sum().clamp_min(1.0)

    @torch.no_grad()
    def generate(self, embedding: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding over the batch: embedding (B, y_dim) -> ids (B, T), T <= max_len (default the model's).

        Each row starts with bos and stops at its eos (kept); later positions of a finished row are pad. The loop
        ends when every row has finished or T reaches max_len (a row without eos is then cut there).
        """
        max_len = self.max_len if max_len is None else max_len
        if not 2 <= max_len <= self.max_len:
            raise ValueError(f"generate max_len={max_len} is outside [2, {self.max_len}] (the model's max_len)")
        batch = embedding.shape[0]
        ids = torch.full((batch, 1), self.bos_id, dtype=torch.long, device=embedding.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=embedding.device)
        for _ in range(max_len - 1):
            next_ids = self(embedding, ids)[:, -1].argmax(dim=-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, self.pad_id), next_ids)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            finished |= next_ids == self.eos_id
            if bool(finished.all()):
                break
        return ids


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def fit_y_decoder(decoder: YDecoder, embeddings: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  epochs: int, lr: float, batch_size: int, device, seed: int = 0,
                  log: Callable[[str], None] | None = None, weight_decay: float = 0.01, warmup_steps: int = 0
                  ) -> list[float]:
    """Train ``decoder`` in place on (embedding, caption) pairs; returns the mean training loss of each epoch.

    embeddings (N, y_dim) (L2-normalised by the caller), input_ids / attention_mask (N, L) right-padded.
    AdamW, LR ``lr`` with ``warmup_steps`` linear warm-up then cosine to 0 over all steps, bf16 autocast on CUDA
    (fp32 elsewhere), batches drawn from a permutation per epoch of a generator seeded by ``seed``. Each batch is
    cut to its longest real caption. ``log`` receives one line per epoch.
    """
    count = embeddings.shape[0]
    if input_ids.shape[0] != count or attention_mask.shape != input_ids.shape:
        raise ValueError(f"embeddings {tuple(embeddings.shape)}, input_ids {tuple(input_ids.shape)} and "
                         f"attention_mask {tuple(attention_mask.shape)} must share N (and the last two their shape)")
    if count == 0:
        raise ValueError("fit_y_decoder got no training pairs (N = 0)")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if value <= 0:
            raise ValueError(f"fit_y_decoder {name}={value} (expected > 0)")
    device = torch.device(device)
    decoder.to(device).train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(count / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine(step, total, warmup_steps))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    generator = torch.Generator().manual_seed(seed)
    lengths = attention_mask.sum(dim=1)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        epoch_loss = torch.zeros((), device=device)
        for start in range(0, count, batch_size):
            idx = order[start:start + batch_size]
            width = max(2, int(lengths[idx].max()))
            batch_emb = embeddings[idx].to(device, non_blocking=True)
            batch_ids = input_ids[idx, :width].to(device, non_blocking=True)
            batch_mask = attention_mask[idx, :width].to(device, non_blocking=True)
            with autocast():
                loss = decoder.loss(batch_emb, batch_ids, batch_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.detach()
        history.append(float(epoch_loss) / steps_per_epoch)
        if log is not None:
            log(f"y-decoder epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f} lr {scheduler.get_last_lr()[0]:.2e}")
    decoder.eval()
    return history
