"""VL-JEPA batches: (image or cached tokens, query text, target text, key) items, tokenized in the workers.

    dataset = VLPairDataset(source, transform, per_image=True, seed=0)       # data.vl_sources.VLSource
    collate = VLCollator(tokenizer, max_query_len=16, max_target_len=32)
    batch = collate([dataset[(i, epoch, b)] for i in ...])
    batch.pixels (B, 3, H, W) uint8 | None, batch.tokens (B, N, D) | None,
    batch.text = {"query": {"input_ids", "attention_mask"} (B, Lq), "target": {...} (B, Lt)}, batch.labels = keys (B,)

The tokenizer is any picklable callable ``tok(texts: list[str], max_length: int) -> {"input_ids": (B, L) long,
"attention_mask": (B, L) long, ...}``; it must accept ``""``: an item without a query carries the empty string, which
a Hugging Face tokenizer turns into its special tokens alone ([CLS] [SEP]).

The ``vl_pairs`` pipeline (registered in ``data.loaders``) builds the training loader of ``data.source``.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable

import torch

from .batch import Batch
from .folder import CorruptImageError, load_rgb_uint8
from .loaders import _loader, register_pipeline
from .sampler import EpochBatchSampler
from .token_cache import TokenCache, fixed_view_transform
from .transforms import pretrain_transform
from .vl_sources import VLSource, open_vl_source

logger = logging.getLogger(__name__)


class VLPairDataset(torch.utils.data.Dataset):
    """The items of one epoch of a ``VLSource``.

    ``per_image=True`` (captions): one item per image (images without pairs are left out), its pair drawn among the
    image's pairs with a seed from ``(seed, epoch, index)``; ``per_image=False`` (VQA, JSONL): one item per pair.
    ``dataset[key]`` takes an int (epoch 0) or an ``EpochBatchSampler`` key ``(index, epoch, batch)``; the transform's
    randomness is seeded from ``(seed, epoch, index)`` too, so a resumed run replays pairs and crops exactly.

    Item: ``{'image': (3, H, W) uint8 | None (corrupt: skipped)}`` or, with ``token_cache``, ``{'tokens': (N, D) |
    None (the image was corrupt when cached)}``, plus ``'query'``, ``'target'``, ``'key'``, ``'index'``,
    ``'image_index'``.
    """

    def __init__(self, source: VLSource, transform: Callable | None, per_image: bool, seed: int,
                 on_corrupt: str = "skip", token_cache: TokenCache | None = None):
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"data.on_corrupt '{on_corrupt}' is unknown (expected 'skip' or 'raise')")
        if token_cache is None and transform is None:
            raise ValueError("VLPairDataset needs a transform when it reads images (no token cache)")
        if token_cache is not None and len(token_cache) != len(source.images):
            raise ValueError(f"token cache '{token_cache.path}' holds {len(token_cache)} images, the source "
                             f"'{source.name}' {len(source.images)}")
        self.source, self.transform, self.per_image = source, transform, per_image
        self.seed, self.on_corrupt, self.token_cache = seed, on_corrupt, token_cache
        # per_image: the pair indices of each image that has pairs; else one pair each
        groups = source.pairs_by_image() if per_image else [[i] for i in range(len(source.pairs))]
        self.groups = [group for group in groups if group]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, key) -> dict:
        index, epoch, batch = (key, 0, None) if isinstance(key, int) else key
        group = self.groups[index]
        choice = random.Random(hash((self.seed, epoch, index, 1))).randrange(len(group)) if len(group) > 1 else 0
        pair = self.source.pairs[group[choice]]
        item = {"query": pair.query, "target": pair.target, "key": pair.key, "index": index,
                "image_index": pair.image}
        if batch is not None:
            item.update(epoch=epoch, batch=batch)
        if self.token_cache is not None:
            item["tokens"] = None if pair.image in self.token_cache.missing else self.token_cache[pair.image]
            return item
        item["image"] = None
        try:
            image = load_rgb_uint8(self.source.images[pair.image])
        except CorruptImageError as err:
            if self.on_corrupt == "raise":
                raise
            logger.warning("skipping %s", err)
            return item
        with torch.random.fork_rng(devices=[]):  # leave the process RNG (dropout, drop-path) untouched
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
            item["image"] = self.transform(image)
        return item


class VLCollator:
    """list of ``VLPairDataset`` items -> ``Batch`` (items whose image / tokens is None are dropped and counted in
    ``skipped``): ``pixels`` (B, 3, H, W) uint8 or ``tokens`` (B, N, D), ``text`` {'query', 'target'} tokenized to
    at most ``max_query_len`` / ``max_target_len``, ``labels`` the target keys (B,) long."""

    REQUIRED = ("input_ids", "attention_mask")

    def __init__(self, tokenizer: Callable, max_query_len: int, max_target_len: int):
        if tokenizer is None:
            raise ValueError("VLCollator needs a tokenizer (the method's parts.tokenizer is None)")
        self.tokenizer, self.max_query_len, self.max_target_len = tokenizer, max_query_len, max_target_len

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        out = dict(self.tokenizer(texts, max_length).items())  # a plain dict: HF's BatchEncoding is no dict
        absent = [name for name in self.REQUIRED if name not in out]
        if absent:
            raise ValueError(f"the tokenizer's output lacks {absent} (it gave {sorted(out)})")
        return out

    def __call__(self, items: list[dict]) -> Batch:
        field = "tokens" if "tokens" in items[0] else "image"
        kept = [item for item in items if item[field] is not None]
        if not kept:
            raise RuntimeError(f"every item of a batch of {len(items)} was a corrupt image; check data.root")
        stacked = torch.stack([item[field] for item in kept])
        return Batch(
            pixels=stacked if field == "image" else None,
            tokens=stacked if field == "tokens" else None,
            text={"query": self.tokenize([item["query"] for item in kept], self.max_query_len),
                  "target": self.tokenize([item["target"] for item in kept], self.max_target_len)},
            labels=torch.tensor([item["key"] for item in kept], dtype=torch.long),
            skipped=torch.tensor(len(items) - len(kept)),
        )


def _build_device() -> torch.device:
    """Where this process builds a token cache: its GPU (``LOCAL_RANK``) when there is one."""
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def vl_transform(d) -> Callable:
    """``data.augment``: RandomResizedCrop(img_size, crop_scale) (+ hflip); else the fixed view (short side resize +
    center crop) the token cache encodes. uint8 in and out."""
    if d.augment:
        return pretrain_transform(d.img_size, d.crop_scale, d.hflip)
    return fixed_view_transform(d.img_size)


def open_token_cache(cfg, source: VLSource, input_encoder) -> TokenCache:
    """The token cache of ``source.images`` under ``input_encoder`` (checks ``data.cache_tokens``' requirements)."""
    d = cfg.data
    if input_encoder is None:
        raise ValueError("data.cache_tokens=true needs the method's input encoder (parts.input_encoder is None): the "
                         "X-encoder must be frozen for its tokens to be computed once")
    if d.augment:
        raise ValueError("data.cache_tokens=true needs data.augment=false: cached tokens are of the fixed view "
                         "(short side resize + center crop)")
    folder = Path(d.token_cache_dir) if d.token_cache_dir else Path(cfg.trainer.output_dir) / "token_cache"
    return TokenCache.build(source.images, input_encoder, d.img_size, folder, dtype=d.cache_dtype,
                            device=_build_device(), batch_size=d.batch_size, num_workers=d.num_workers,
                            on_corrupt=d.on_corrupt)


@register_pipeline("vl_pairs")
def vl_pairs(cfg, parts, rank: int = 0, world_size: int = 1, pin_memory: bool = True):
    """(image | cached tokens, query, target) batches of ``data.source``'s train split: one item per image for
    captions (``flickr``: a caption drawn per epoch), one per pair otherwise."""
    d = cfg.data
    source = open_vl_source(d, "train")
    if parts.tokenizer is None:
        raise ValueError(f"data pipeline 'vl_pairs' needs the method's tokenizer (parts.tokenizer is None for method "
                         f"'{getattr(cfg, 'method', '?')}')")
    cache = open_token_cache(cfg, source, parts.input_encoder) if d.cache_tokens else None
    transform = None if cache is not None else vl_transform(d)
    dataset = VLPairDataset(source, transform, per_image=d.source == "flickr", seed=cfg.trainer.seed,
                            on_corrupt=d.on_corrupt, token_cache=cache)
    batch_sampler = EpochBatchSampler(len(dataset), d.batch_size, seed=cfg.trainer.seed, rank=rank,
                                      world_size=world_size)
    collate = VLCollator(parts.tokenizer, d.max_query_len, d.max_target_len)
    return _loader(dataset, batch_sampler, collate, cfg, pin_memory), batch_sampler
