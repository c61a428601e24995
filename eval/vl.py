"""VL-JEPA evaluations, all nearest-neighbour look-ups in the Y-encoder's embedding space:

- ``vl_retrieval`` (``jepa eval vl-retrieval``): image -> text and text -> image R@1/5/10 on a caption source's split
  (Flickr8k-1k test: 100 images, 500 captions); the image embedding is the prediction for the caption query.
- ``vl_classify``: zero-shot classification of an image folder's val split from class-name prompts
  (Imagenette: ``a photo of a {name}.``); accuracy = nearest prompt.
- ``vqa``: easy-VQA test accuracy, overall and per question type, by the nearest candidate answer.

``--encoder`` is a VL-JEPA training output or checkpoint folder. The VL training monitor (``build_vl_monitor``) is
the same look-up on the training source's val split (R@1 for captions, accuracy for VQA).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from data.folder import scan_split
from data.vl_sources import IMAGENETTE_CLASSNAMES, class_prompts, easyvqa_source, flickr_source, open_vl_source
from jepa.config import knob

from .results import Record, format_table, pct
from .tasks import EvalRun, register_task
from .vl_embed import embed_images, embed_texts, nearest_candidate, retrieval_recalls


@dataclass
class RetrievalConfig:
    split: str = "test"
    ks: list[int] = knob(factory=lambda: [1, 5, 10], gt=0)
    batch_size: int = knob(128, gt=0)
    query: str = ""  # '': the model's training caption query


@dataclass
class ClassifyConfig:
    split: str = "val"
    template: str = "a photo of a {}."
    batch_size: int = knob(128, gt=0)
    query: str = ""


@dataclass
class VQAConfig:
    split: str = "test"
    batch_size: int = knob(256, gt=0)
    limit: int = knob(0, ge=0)  # 0: every question of the split


def caption_retrieval(embedder, source, query: str, img_size: int, device, ks, batch_size: int = 128,
                      autocast=contextlib.nullcontext) -> dict[str, dict[int, float]]:
    """R@k both ways for ``source`` (a ``data.vl_sources.VLSource`` of captions)."""
    captions = source.captions_by_image()
    texts = [text for per_image in captions for text in per_image]
    text_image = torch.tensor([i for i, per_image in enumerate(captions) for _ in per_image], device=device)
    images = embed_images(embedder, source.images, query, img_size, device, batch_size, autocast=autocast)
    return retrieval_recalls(images, embed_texts(embedder, texts, device, autocast=autocast), text_image, ks)


def vqa_predictions(embedder, source, img_size: int, device, batch_size: int = 256, limit: int = 0,
                    autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted candidate index, true candidate index) for the first ``limit`` (0: all) questions of ``source``."""
    pairs = source.pairs[:limit] if limit else source.pairs
    candidates = embed_texts(embedder, list(source.candidates), device, autocast=autocast)
    pred = embed_images(embedder, [source.images[p.image] for p in pairs], [p.query for p in pairs], img_size,
                        device, batch_size, autocast=autocast)
    index = {text: i for i, text in enumerate(source.candidates)}
    truth = torch.tensor([index[p.target] for p in pairs], device=device)
    return nearest_candidate(pred, candidates), truth


def vl_setup(run: EvalRun):
    """(task section, embedder on the device, device, autocast) on the main process, None on the others (one
    process embeds: the VL evaluation splits are small)."""
    if not run.accelerator.is_main_process:
        return None
    embedder = run.vl.embedder.to(run.accelerator.device)
    return run.section, embedder, run.accelerator.device, run.accelerator.autocast


@register_task("vl_retrieval", config=RetrievalConfig, needs="vl")
def run_vl_retrieval(run: EvalRun) -> list[Record]:
    """Image<->text retrieval R@k on a caption source (--data: the Flickr8k-1k folder; default: the training one)."""
    if (setup := vl_setup(run)) is None:
        return []
    c, embedder, device, autocast = setup
    source = flickr_source(run.data, c.split, run.vl.cfg.data.split_file or None)
    recalls = caption_retrieval(embedder, source, c.query or run.vl.caption_query, run.img_size, device, c.ks,
                                c.batch_size, autocast)
    rows, records = [], []
    for direction, by_k in recalls.items():
        rows.append((direction.replace("_", " "), *(pct(by_k[k]) for k in c.ks)))
        records += [run.record(f"{direction}_R@{k}", v, split=c.split) for k, v in by_k.items()]
    run.say(f"{c.split}: {len(source.images)} images, {len(source.pairs)} captions")
    run.say(format_table(rows, ("direction", *(f"R@{k} %" for k in c.ks))))
    return records


@register_task("vl_classify", config=ClassifyConfig, needs="vl")
def run_vl_classify(run: EvalRun) -> list[Record]:
    """Zero-shot classification of an image folder's split by the nearest class-name prompt (--data: Imagenette)."""
    if (setup := vl_setup(run)) is None:
        return []
    c, embedder, device, autocast = setup
    samples, classes = scan_split(run.data, c.split)
    names = [IMAGENETTE_CLASSNAMES.get(name, name.replace("_", " ")) for name in classes]
    prompts = embed_texts(embedder, class_prompts(names, c.template), device, autocast=autocast)
    images = embed_images(embedder, [path for path, _ in samples], c.query or run.vl.caption_query, run.img_size,
                          device, c.batch_size, autocast=autocast)
    labels = torch.tensor([label for _, label in samples], device=device)
    hits = nearest_candidate(images, prompts) == labels
    present = sorted(set(labels.tolist()))  # classes is the root's (train's) list; a split may lack some
    per_class = [(names[i], hits[labels == i].float().mean().item()) for i in present]
    accuracy = hits.float().mean().item()
    run.say(format_table([(n, pct(a)) for n, a in per_class] + [("all", pct(accuracy))],
                         ("class", "zero-shot top-1 %")))
    run.say(f"chance: {pct(1 / len(classes))}%")
    return [run.record("zero_shot_top1", accuracy, split=c.split, template=c.template, classes=names)]


@register_task("vqa", config=VQAConfig, needs="vl")
def run_vqa(run: EvalRun) -> list[Record]:
    """easy-VQA accuracy by the nearest candidate answer, overall and per question type (--data: easyvqa)."""
    if (setup := vl_setup(run)) is None:
        return []
    c, embedder, device, autocast = setup
    source = easyvqa_source(c.split)
    pred, truth = vqa_predictions(embedder, source, run.img_size, device, c.batch_size, c.limit, autocast)
    hits = (pred == truth).cpu()
    types = (source.question_types or ["all"] * len(source.pairs))[:len(hits)]
    rows, records = [], []
    for kind in sorted(set(types)):
        chosen = torch.tensor([t == kind for t in types])
        accuracy = hits[chosen].float().mean().item()
        rows.append((kind, str(int(chosen.sum())), pct(accuracy)))
        records.append(run.record(f"accuracy/{kind}", accuracy, split=c.split))
    overall = hits.float().mean().item()
    rows.append(("all", str(len(hits)), pct(overall)))
    records.append(run.record("accuracy", overall, split=c.split))
    run.say(format_table(rows, ("question type", "questions", "accuracy %")))
    return records


class VLMonitor:
    """The VL training monitor: val R@1 (image -> text) of a caption source, or val VQA accuracy."""

    def __init__(self, cfg, limit: int = 1000):
        self.cfg, self.limit = cfg, limit
        self.source = open_vl_source(cfg.data, "val")
        self.kind = "vqa" if self.source.candidates is not None else "captions"
        self.name = "vqa_acc" if self.kind == "vqa" else "r1_i2t"

    def __call__(self, embedder, device, autocast=contextlib.nullcontext) -> float:
        was_training = embedder.training
        embedder.eval()
        try:
            size = self.cfg.data.img_size
            if self.kind == "vqa":
                pred, truth = vqa_predictions(embedder, self.source, size, device, limit=self.limit,
                                              autocast=autocast)
                return (pred == truth).float().mean().item()
            recalls = caption_retrieval(embedder, self.source, self.cfg.data.caption_query, size, device, [1],
                                        autocast=autocast)
            return recalls["image_to_text"][1]
        finally:
            embedder.train(was_training)


def build_vl_monitor(cfg) -> list[VLMonitor]:
    """[the monitor of the training source's val split] (none for a JSONL source, which has no val split)."""
    return [] if cfg.data.source == "jsonl" else [VLMonitor(cfg)]
