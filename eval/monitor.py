"""The training kNN monitor: kNN top-1 of the method's monitor encoder on fixed labelled subsets, with the eval kNN
(``eval.knn``) on the eval pooling (``eval.features.pool_layers``).

    monitor = build_knn_monitor(cfg.data.root, img_size, cfg.monitor, num_workers, cfg.trainer.seed,
                                cfg.data.on_corrupt)
    accuracy = monitor(encoder, device, accelerator.autocast)  # the trainer logs it as monitor/knn
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn

from data.labelled import LabelledSourceError, build_labelled_loader

from .features import encode_batches, pool_layers
from .knn import knn_accuracy


class KNNMonitor:
    """kNN (cosine, k, temperature) top-1 accuracy: bank = labelled train subset, queries = val subset; features are
    the encoder's last-layer tokens (B, N, D), mean-pooled."""

    name = "knn"

    def __init__(self, bank_loader: Iterable, query_loader: Iterable, num_classes: int, k: int = 20,
                 temperature: float = 0.07):
        self.bank_loader, self.query_loader = bank_loader, query_loader
        self.num_classes, self.k, self.temperature = num_classes, k, temperature

    def __call__(self, encoder: nn.Module, device: torch.device, autocast=contextlib.nullcontext) -> float:
        was_training = encoder.training
        encoder.eval()
        try:
            encode = lambda images: pool_layers([encoder(images)])  # noqa: E731
            bank, bank_labels = self.encode(self.bank_loader, "bank (train)", encode, device, autocast)
            queries, query_labels = self.encode(self.query_loader, "query (val)", encode, device, autocast)
        finally:
            encoder.train(was_training)
        accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, self.num_classes, [self.k], self.temperature)
        return accuracy[self.k]["top1"]

    @staticmethod
    def encode(loader: Iterable, role: str, encode, device: torch.device, autocast) -> tuple[torch.Tensor, ...]:
        """(features, labels) of one loader; a set whose every file was skipped as corrupt is an error naming it."""
        features, labels = encode_batches(loader, encode, device, autocast)
        if len(labels) == 0:
            source = getattr(loader, "dataset", None)
            count = f"{len(source)} samples" if source is not None else "samples"
            where = getattr(source, "location", "its data")
            raise LabelledSourceError(f"kNN monitor: every one of the {count} of its {role} set '{where}' is corrupt "
                                      f"or unreadable (skipped by data.on_corrupt=skip; the warnings above name "
                                      f"each file)")
        return features, labels


def build_knn_monitor(root: str, img_size: int, monitor_cfg, num_workers: int, seed: int,
                      on_corrupt: str = "skip") -> KNNMonitor:
    """The monitor over ``monitor_cfg.bank_per_class`` train and ``query_per_class`` val images per class (0: the whole
    split), both labelled by the root's one class list; ``monitor_cfg`` has ``knn_k``, ``knn_temperature``,
    ``bank_per_class``, ``query_per_class``, ``batch_size`` (``jepa.sections.MonitorConfig``); ``on_corrupt`` is
    ``data.on_corrupt``."""
    m = monitor_cfg
    bank = build_labelled_loader(root, "train", img_size, m.bank_per_class, m.batch_size, num_workers, seed=seed,
                                 on_corrupt=on_corrupt)
    queries = build_labelled_loader(root, "val", img_size, m.query_per_class, m.batch_size, num_workers, seed=seed,
                                    on_corrupt=on_corrupt)
    return KNNMonitor(bank, queries, num_classes=len(bank.dataset.classes), k=m.knn_k, temperature=m.knn_temperature)


def build_video_knn_monitor(cfg) -> KNNMonitor:
    """The kNN monitor of a clip-data config (``data.frames_per_clip``): one centred clip per video of the train/val
    manifests or class folders, the same clip length and step as pretraining; val uses train's class list."""
    from data.labelled import labelled_loader, per_class_subset
    from data.loaders import clip_dataset
    from data.video import video_eval_transform

    d, m = cfg.data, cfg.monitor
    transform = video_eval_transform(m.knn_img_size or d.img_size, normalize=True)
    loaders, classes = [], None
    for split, per_class in (("train", m.bank_per_class), ("val", m.query_per_class)):
        source = clip_dataset(cfg, split, transform, "uniform", classes)
        classes = source.classes
        indices = per_class_subset(source.labels, per_class, cfg.trainer.seed)
        loaders.append(labelled_loader(source if indices is None else source.subset(indices), m.batch_size,
                                       min(d.num_workers, 4)))
    return KNNMonitor(*loaders, num_classes=len(classes), k=m.knn_k, temperature=m.knn_temperature)


def build_training_monitors(cfg) -> list[KNNMonitor]:
    """The monitors ``train.py`` gives the trainer: the kNN monitor over the config's labelled images or clips; VL-JEPA:
    val retrieval / VQA accuracy (``eval.vl.build_vl_monitor``)."""
    if cfg.method == "vljepa":
        from .vl import build_vl_monitor

        return build_vl_monitor(cfg)
    if hasattr(cfg.data, "frames_per_clip"):
        return [build_video_knn_monitor(cfg)]
    m = cfg.monitor
    return [build_knn_monitor(cfg.data.root, m.knn_img_size or cfg.data.img_size, m, min(cfg.data.num_workers, 4),
                              cfg.trainer.seed, cfg.data.on_corrupt)]
