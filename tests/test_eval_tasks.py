"""The eval frame: a task is one registration (run here through `jepa eval`), labelled sources fingerprint their
files, and the training kNN monitor is the eval kNN on the eval pooling."""
import json
import os
import shutil
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import torch.nn.functional as F

from data.folder import ImageFolderDataset
from data.labelled import LabelledSource
from data.subsets import TooFewSamplesError, per_class_choice, per_class_shuffled
from data.transforms import eval_transform
from eval.encoders import load_frozen_encoder
from eval.monitor import build_knn_monitor
from eval.tasks import EvalRun, load_eval_config, register_task, task_names
from jepa.cli import main
from jepa.config import ConfigError, knob
from jepa.sections import MonitorConfig

from conftest import IMAGENETTE


@dataclass
class CentroidConfig:
    metric: Literal["cosine", "euclidean"] = "cosine"
    shrink: float = knob(0.0, ge=0, lt=1)  # pull every centroid toward the mean of all centroids

    def check(self, prefix: str) -> None:
        if self.metric == "cosine" and self.shrink > 0.5:
            raise ConfigError(f"config key '{prefix}shrink' must be <= 0.5 with {prefix}metric=cosine, "
                              f"got {self.shrink}")


@register_task("centroid", config=CentroidConfig)
def run_centroid(run: EvalRun):
    """Nearest class centroid on pooled features (a toy task)."""
    train, val = run.features("train"), run.features("val")
    c = run.section
    centroids = torch.stack([train.features[train.labels == k].mean(0) for k in range(len(train.classes))])
    centroids = (1 - c.shrink) * centroids + c.shrink * centroids.mean(0)
    if c.metric == "cosine":
        scores = F.normalize(val.features, dim=-1) @ F.normalize(centroids, dim=-1).T
    else:
        scores = -torch.cdist(val.features, centroids)
    top1 = (scores.argmax(1) == val.labels).float().mean().item()
    run.say(f"centroid top-1 {100 * top1:.2f}%")
    return [run.record("top1", top1)]


def test_registered_task_runs_through_the_cli(imagenette_small, tmp_path, capsys):
    assert {"centroid", "knn", "linear", "attentive", "lowshot"} <= set(task_names())
    out = tmp_path / "out"
    main(["eval", "centroid", "--encoder", "timm:resnet10t", "--data", str(imagenette_small), "--out", str(out),
          f"features.cache_dir={tmp_path / 'cache'}", "features.num_workers=0", "features.progress_bar=false",
          "features.img_size=32", "centroid.metric=euclidean", "centroid.shrink=0.25"])
    text = capsys.readouterr().out
    assert "jepa eval centroid" in text and "train: 80 images" in text and "centroid top-1" in text
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["task"] == "centroid" and record["metric"] == "top1" and 0.0 <= record["value"] <= 1.0
    assert record["config"]["centroid"] == {"metric": "euclidean", "shrink": 0.25}
    assert record["config"]["features"]["img_size"] == 32 and "knn" not in record["config"]


def test_task_config_keys_and_rules(capsys):
    assert load_eval_config("centroid").centroid == CentroidConfig()
    with pytest.raises(ConfigError, match="unknown config key 'centroid.metrc'; closest valid keys: centroid.metric"):
        load_eval_config("centroid", None, ["centroid.metrc=cosine"])
    with pytest.raises(ConfigError, match="unknown config key 'knn.ks'.*section of the knn task; this is a centroid"):
        load_eval_config("centroid", None, ["knn.ks=[5]"])
    with pytest.raises(ConfigError, match="unknown config key 'linear.epochs'"):
        load_eval_config("knn", None, ["linear.epochs=5"])
    with pytest.raises(ConfigError, match=r"'centroid.metric' is 'manhattan'; expected one of \['cosine', 'eucl"):
        load_eval_config("centroid", None, ["centroid.metric=manhattan"])
    with pytest.raises(ConfigError, match="'centroid.shrink' must be < 1, got 1.5"):
        load_eval_config("centroid", None, ["centroid.shrink=1.5", "centroid.metric=euclidean"])
    with pytest.raises(ConfigError, match="'centroid.shrink' must be <= 0.5 with centroid.metric=cosine"):
        load_eval_config("centroid", None, ["centroid.shrink=0.7"])
    with pytest.raises(ConfigError, match="'features.precision' is 'fp16'"):
        load_eval_config("knn", None, ["features.precision=fp16"])
    with pytest.raises(ConfigError, match=r"'knn.ks' must be > 0"):
        load_eval_config("knn", None, ["knn.ks=[5,0]"])
    with pytest.raises(ConfigError, match=r"eval task 'nope' is unknown \(expected one of \[.*'centroid'.*'knn'"):
        load_eval_config("nope")
    with pytest.raises(SystemExit):
        main(["eval", "nope", "--encoder", "timm:resnet10t", "--data", "x"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'knn' is already registered"):
        register_task("knn", config=CentroidConfig)(run_centroid)


def test_source_fingerprint_follows_the_files(tmp_path):
    for cls in sorted((IMAGENETTE / "train").iterdir())[:2]:
        (tmp_path / "train" / cls.name).mkdir(parents=True)
        for image in sorted(cls.iterdir())[:2]:
            shutil.copy(image, tmp_path / "train" / cls.name / image.name)  # copies: the test rewrites them
    source = ImageFolderDataset(tmp_path, "train", eval_transform(32))
    assert isinstance(source, LabelledSource) and len(source) == 4 and source.labels == [0, 0, 1, 1]
    first = source.fingerprint()
    assert ImageFolderDataset(tmp_path, "train", eval_transform(64)).fingerprint() == first  # the files, not the view
    item = source[3]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 1 and item["index"] == 3

    path = source.samples[1][0]
    path.write_bytes(path.read_bytes() + b"\0")  # same name, other content (size and mtime change)
    changed = ImageFolderDataset(tmp_path, "train", eval_transform(32)).fingerprint()
    assert changed != first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched only
    touched = ImageFolderDataset(tmp_path, "train", eval_transform(32)).fingerprint()
    assert touched != changed
    assert ImageFolderDataset(tmp_path, "train", eval_transform(32)).fingerprint() == touched  # stable otherwise

    subset = source.subset([0, 2])
    assert subset.labels == [0, 1] and subset.classes == source.classes and subset.fingerprint() != touched
    path.unlink()
    assert ImageFolderDataset(tmp_path, "train", eval_transform(32)).fingerprint() not in (first, changed, touched)


def test_per_class_sampler():
    labels = [0] * 5 + [1] * 3 + [2] * 7
    picked = per_class_choice(labels, 3, seed=1)
    assert picked == sorted(picked) and [labels[i] for i in picked] == [0] * 3 + [1] * 3 + [2] * 3
    assert picked == per_class_choice(torch.tensor(labels), 3, seed=1)  # lists and tensors alike
    assert len(per_class_choice(labels, 4, seed=1, allow_fewer=True)) == 4 + 3 + 4
    with pytest.raises(TooFewSamplesError, match="class 1 has only 3 samples"):
        per_class_choice(labels, 4, seed=1)
    shuffled = list(per_class_shuffled(labels, seed=2))
    assert [sorted(m.tolist()) for m in shuffled] == [list(range(5)), [5, 6, 7], list(range(8, 15))]
    assert [m.tolist() for m in shuffled] == [m.tolist() for m in per_class_shuffled(labels, seed=2)]


class _Tokens(torch.nn.Module):
    """A plain module returning (B, N, D) tokens: the FrozenEncoder's tokens of a timm model."""

    def __init__(self, frozen):
        super().__init__()
        self.frozen = frozen
        self.inner = frozen.module

    def forward(self, images):
        return self.frozen.tokens(images)


def test_knn_monitor_is_the_eval_knn(imagenette_small, tmp_path, capsys):
    cfg = MonitorConfig(knn_k=5, bank_per_class=6, query_per_class=0, batch_size=16)
    monitor = build_knn_monitor(str(imagenette_small), 32, cfg, num_workers=0, seed=0)
    assert monitor.name == "knn" and len(monitor.bank_loader.dataset) == 60
    assert len(monitor.query_loader.dataset) == 40 and monitor.num_classes == 10
    encoder = _Tokens(load_frozen_encoder("timm:resnet10t", img_size=32))
    encoder.train()
    value = monitor(encoder, torch.device("cpu"))
    assert 0.0 <= value <= 1.0 and encoder.training  # the encoder's mode is restored

    # the same kNN through `jepa eval knn` on the whole split gives the same number as the monitor on it
    whole = build_knn_monitor(str(imagenette_small), 32, MonitorConfig(knn_k=5, batch_size=16), 0, 0)
    main(["eval", "knn", "--encoder", "timm:resnet10t", "--data", str(imagenette_small), "--out", str(tmp_path),
          f"features.cache_dir={tmp_path / 'cache'}", "features.num_workers=0", "features.progress_bar=false",
          "features.img_size=32", "knn.ks=[5]"])
    capsys.readouterr()
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    (top1,) = [r["value"] for r in records if r["metric"] == "top1@k=5"]
    assert abs(whole(encoder, torch.device("cpu")) - top1) < 1e-6
