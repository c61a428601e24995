"""Turning predicted Y-space embeddings into text: ``decoder.decode(embedding) -> texts``.

Two decoders share that interface (what a streaming pipeline calls, for one embedding or a batch):
- ``CaptionBank``: retrieval, the caption of a bank whose embedding has the highest cosine similarity;
- ``GenerativeDecoder``: a trained ``predictors.y_decoder.YDecoder`` decoding greedily, its ids turned into text
  by a tokenizer (a Hugging Face tokenizer, or anything with ``decode(list[int]) -> str``).
``decoder_for(kind, ...)`` builds either by name.

An embedding (D,) is a batch of one: ``decode`` always returns one entry per row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from predictors.y_decoder import YDecoder

DECODER_KINDS = ("bank", "generative")


def _as_batch(embedding: torch.Tensor, dim: int, owner: str) -> torch.Tensor:
    """(D,) or (B, D) -> (B, D) float, checked against ``dim``."""
    if not isinstance(embedding, torch.Tensor):
        raise ValueError(f"{owner}.decode got {type(embedding).__name__} (expected a tensor (D,) or (B, D))")
    if embedding.ndim == 1:
        embedding = embedding[None]
    if embedding.ndim != 2 or embedding.shape[1] != dim:
        raise ValueError(f"{owner}.decode got an embedding of shape {tuple(embedding.shape)} "
                         f"(expected ({dim},) or (B, {dim}))")
    return embedding.float()


class CaptionBank:
    """Decode by retrieval over a caption bank.

    texts: N captions; embeddings (N, D) their Y-space embeddings (L2-normalised here).
    decode(embedding (D,) | (B, D), k) -> B texts (k = 1) or B lists of the k nearest texts, nearest first.
    """

    def __init__(self, texts: list[str], embeddings: torch.Tensor):
        if embeddings.ndim != 2:
            raise ValueError(f"CaptionBank embeddings have shape {tuple(embeddings.shape)} (expected (N, D))")
        if len(texts) != embeddings.shape[0]:
            raise ValueError(f"CaptionBank got {len(texts)} texts but {embeddings.shape[0]} embeddings "
                             f"(expected one embedding per text)")
        if not texts:
            raise ValueError("CaptionBank got an empty bank (expected at least one caption)")
        self.texts = list(texts)
        self.embeddings = F.normalize(embeddings.detach().float(), dim=-1)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return len(self.texts)

    @torch.no_grad()
    def nearest(self, embedding: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (D,) | (B, D) -> (cosine similarities (B, k), bank indices (B, k)), most similar first."""
        if not 1 <= k <= len(self):
            raise ValueError(f"CaptionBank k={k} is outside [1, {len(self)}] (the bank size)")
        queries = F.normalize(_as_batch(embedding, self.dim, "CaptionBank").to(self.embeddings.device), dim=-1)
        return (queries @ self.embeddings.T).topk(k, dim=-1)

    def decode(self, embedding: torch.Tensor, k: int = 1) -> list[str] | list[list[str]]:
        _, indices = self.nearest(embedding, k)
        rows = indices.cpu().tolist()
        if k == 1:
            return [self.texts[row[0]] for row in rows]
        return [[self.texts[i] for i in row] for row in rows]


class GenerativeDecoder:
    """Decode with a trained ``YDecoder`` (greedy) and a tokenizer.

    decode(embedding (D,) | (B, D)) -> B texts. The embedding is L2-normalised (as in training); ids after bos up to
    (not including) eos go to ``tokenizer.decode``.
    """

    def __init__(self, decoder: YDecoder, tokenizer, max_len: int | None = None):
        if not isinstance(decoder, YDecoder):
            raise ValueError(f"GenerativeDecoder needs a predictors.y_decoder.YDecoder, got {type(decoder).__name__}")
        if not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"GenerativeDecoder's tokenizer ({type(tokenizer).__name__}) has no decode(ids) method")
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.max_len = max_len

    def token_ids(self, ids: torch.Tensor) -> list[list[int]]:
        """Generated ids (B, T) -> per row, the ids strictly between bos and the first eos (pad and other special
        ids of the decoder removed)."""
        specials = {self.decoder.bos_id, self.decoder.pad_id}
        rows = []
        for row in ids.cpu().tolist():
            row = row[1:] if row and row[0] == self.decoder.bos_id else row
            if self.decoder.eos_id in row:
                row = row[:row.index(self.decoder.eos_id)]
            rows.append([i for i in row if i not in specials])
        return rows

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor) -> list[str]:
        param = next(self.decoder.parameters())
        queries = F.normalize(_as_batch(embedding, self.decoder.y_dim, "GenerativeDecoder"), dim=-1)
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            ids = self.decoder.generate(queries.to(param.device), self.max_len)
        finally:
            self.decoder.train(was_training)
        return [self.tokenizer.decode(row).strip() for row in self.token_ids(ids)]


def decoder_for(kind: str, *, texts: list[str] | None = None, embeddings: torch.Tensor | None = None,
                decoder: YDecoder | None = None, tokenizer=None, max_len: int | None = None
                ) -> CaptionBank | GenerativeDecoder:
    """``"bank"`` (needs ``texts`` and ``embeddings``) -> ``CaptionBank``; ``"generative"`` (needs ``decoder`` and
    ``tokenizer``; optional ``max_len``) -> ``GenerativeDecoder``."""
    if kind == "bank":
        missing = [name for name, value in (("texts", texts), ("embeddings", embeddings)) if value is None]
        if missing:
            raise ValueError(f"decoder kind 'bank' needs {' and '.join(missing)} (the caption bank and its "
                             f"(N, D) embeddings)")
        extra = [name for name, value in (("decoder", decoder), ("tokenizer", tokenizer), ("max_len", max_len))
                 if value is not None]
        if extra:
            raise ValueError(f"decoder kind 'bank' does not take {', '.join(extra)} (those are for 'generative')")
        return CaptionBank(texts, embeddings)
    if kind == "generative":
        missing = [name for name, value in (("decoder", decoder), ("tokenizer", tokenizer)) if value is None]
        if missing:
            raise ValueError(f"decoder kind 'generative' needs {' and '.join(missing)} (a trained YDecoder and a "
                             f"tokenizer with decode(ids))")
        extra = [name for name, value in (("texts", texts), ("embeddings", embeddings)) if value is not None]
        if extra:
            raise ValueError(f"decoder kind 'generative' does not take {', '.join(extra)} (those are for 'bank')")
        return GenerativeDecoder(decoder, tokenizer, max_len)
    raise ValueError(f"decoder kind '{kind}' is unknown (expected one of {list(DECODER_KINDS)})")
