"""Embedding images, image+query pairs and texts with a VL-JEPA model (``jepa.methods.vljepa.VLEmbedder``), and the
look-ups every VL evaluation is made of: retrieval ranks, nearest-candidate answers.

    vl = load_vl("runs/vl_flickr")                      # the checkpoint's model, teachers and config
    images = embed_images(vl.embedder, paths, "describe the image", vl.img_size, device)   (N, Dy) normalised
    texts = embed_texts(vl.embedder, captions, device)                                      (M, Dy) normalised
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from data.folder import load_rgb_uint8
from data.transforms import eval_transform


@dataclass
class LoadedVL:
    embedder: torch.nn.Module  # VLEmbedder: image_query(...), text(...), tokenizer
    cfg: object  # the training config
    ckpt: Path
    name: str  # what the user passed

    @property
    def img_size(self) -> int:
        return self.cfg.data.img_size

    @property
    def caption_query(self) -> str:
        return self.cfg.data.caption_query


def load_vl(spec: str) -> LoadedVL:
    """A VL-JEPA training output or checkpoint folder; errors name the value."""
    from jepa.encoder_spec import EncoderSpecError
    from jepa.reader import EncoderReadError, load_checkpoint_parts

    try:
        parts, cfg, ckpt = load_checkpoint_parts(spec)
    except EncoderReadError as err:
        raise EncoderSpecError(f"--encoder '{spec}': {err}") from err
    if cfg.method != "vljepa":
        raise EncoderSpecError(f"--encoder '{spec}' is a '{cfg.method}' checkpoint; VL tasks need a VL-JEPA one "
                               f"(train with configs/vljepa/...)")
    return LoadedVL(parts.monitor_encoder.eval(), cfg, ckpt, spec)


class ImagePaths(torch.utils.data.Dataset):
    """Images by path, resized (short side) and center-cropped to ``img_size``, normalised: (3, S, S) float."""

    def __init__(self, paths: list[Path], img_size: int):
        self.paths, self.transform = list(paths), eval_transform(img_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_rgb_uint8(self.paths[index]))


def _loader(dataset, batch_size: int, num_workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       persistent_workers=False)


def _tokenize(embedder, texts: list[str], device) -> dict:
    return {k: v.to(device) for k, v in embedder.tokenizer(texts).items()}


@torch.no_grad()
def embed_texts(embedder, texts: list[str], device, batch_size: int = 256, autocast=contextlib.nullcontext
                ) -> torch.Tensor:
    """(M, Dy) L2-normalised Y-encoder embeddings of ``texts``."""
    out = []
    for start in range(0, len(texts), batch_size):
        with autocast():
            out.append(embedder.text(_tokenize(embedder, texts[start:start + batch_size], device)).float())
    return torch.cat(out)


@torch.no_grad()
def embed_images(embedder, paths: list[Path], queries: str | list[str], img_size: int, device, batch_size: int = 128,
                 num_workers: int = 2, autocast=contextlib.nullcontext) -> torch.Tensor:
    """(N, Dy) L2-normalised predicted embeddings of image i with ``queries`` (one query for all, or one per image)."""
    if not isinstance(queries, str) and len(queries) != len(paths):
        raise ValueError(f"{len(queries)} queries for {len(paths)} images (expected one query or one per image)")
    out, start = [], 0
    for pixels in _loader(ImagePaths(paths, img_size), batch_size, num_workers):
        count = len(pixels)
        texts = [queries] * count if isinstance(queries, str) else list(queries[start:start + count])
        with autocast():
            out.append(embedder.image_query(pixels.to(device), _tokenize(embedder, texts, device)).float())
        start += count
    return torch.cat(out)


def recall_at_k(scores: torch.Tensor, relevant: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """scores (Q, C) similarities, relevant (Q, C) bool -> {k: fraction of queries with a relevant item among their
    k best}."""
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1).indices
    hit = relevant.gather(1, top)
    return {k: hit[:, :min(k, k_max)].any(1).float().mean().item() for k in ks}


def retrieval_recalls(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                      ks: list[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """image_emb (N, D), text_emb (M, D) normalised, text_image (M,) the image of each text ->
    {'image_to_text': {k: R@k}, 'text_to_image': {k: R@k}}."""
    relevant = text_image[None, :] == torch.arange(len(image_emb), device=text_image.device)[:, None]  # (N, M)
    scores = image_emb @ text_emb.T
    return {"image_to_text": recall_at_k(scores, relevant, list(ks)),
            "text_to_image": recall_at_k(scores.T, relevant.T, list(ks))}


def nearest_candidate(pred: torch.Tensor, candidate_emb: torch.Tensor) -> torch.Tensor:
    """pred (Q, D), candidate_emb (C, D) normalised -> (Q,) index of the most similar candidate."""
    return (pred @ candidate_emb.T).argmax(1)


def frame_embedder(embedder, query: str, img_size: int, device, autocast=contextlib.nullcontext):
    """A callable: frames (B, 3, H, W) uint8 -> (B, Dy) L2-normalised predicted embeddings for ``query`` (each frame
    resized on its short side and center-cropped to ``img_size``, as in evaluation). What a stream is embedded with."""
    from torchvision.transforms import InterpolationMode, v2

    from data.transforms import IMAGENET_MEAN, IMAGENET_STD

    transform = v2.Compose([v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(img_size)])
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    tokens_cache: dict[int, dict] = {}

    @torch.no_grad()
    def embed(frames: torch.Tensor) -> torch.Tensor:
        pixels = transform(frames).to(device).float().div(255)
        count = len(pixels)
        if count not in tokens_cache:
            tokens_cache[count] = _tokenize(embedder, [query] * count, device)
        with autocast():
            return embedder.image_query((pixels - mean) / std, tokens_cache[count]).float()

    return embed
