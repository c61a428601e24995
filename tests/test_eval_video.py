"""`jepa eval` on clips: a tiny camera-motion set made from real Imagenette images, a V-JEPA checkpoint trained on its
manifests through train.py, and the attentive / kNN probes reporting motion and object accuracy per label column,
with several clips and crops per video averaged."""
import json

import pytest
import torch

import train
from data.labelled import (ClipCrops, ClipSettings, LabelledSourceError, find_labelled_source,
                           open_labelled_source)
from data.motion import MotionSpec, make_motion_dataset
from jepa.cli import main
from jepa.config import ConfigError

from conftest import REPO, make_subset

CONFIG = str(REPO / "configs" / "vjepa" / "tiny_cpu.yaml")
LABELS = ("motion", "object")
METRICS = {"top1_selected", "top5_selected", "top1_best_of_grid", "top5_best_of_grid"}


@pytest.fixture(scope="module")
def motion_set(tmp_path_factory):
    """2 object classes x 7 train / 4 val clips of 8 frames at 32 px (every motion twice in train)."""
    images = make_subset(tmp_path_factory.mktemp("motion_images"), 7, 4, classes=2)
    out = tmp_path_factory.mktemp("motion")
    make_motion_dataset(images, out, per_class=7, spec=MotionSpec(frames=8, size=32), seed=0)
    return out


@pytest.fixture(scope="module")
def checkpoint(motion_set, tmp_path_factory):
    """A tiny V-JEPA run of 2 steps on the motion set's manifests (8-frame clips: frame step 1)."""
    out = tmp_path_factory.mktemp("vjepa_run")
    train.main(["--config", CONFIG, f"data.train_manifest={motion_set / 'train.csv'}",
                f"data.val_manifest={motion_set / 'val.csv'}", "data.label_column=motion", "data.frame_step=1",
                f"trainer.output_dir={out}", "trainer.progress_bar=false", "trainer.max_steps=2",
                "trainer.checkpoint_every=2", "monitor.knn_every=0"])
    assert (out / "checkpoint-00000002" / "target_encoder.safetensors").is_file()
    return out


def evaluate(task, encoder, data, out, cache, *overrides):
    main(["eval", task, "--encoder", str(encoder), "--data", str(data), "--out", str(out),
                 f"features.cache_dir={cache}", "features.num_workers=0", "features.progress_bar=false",
                 "features.batch_size=8", *overrides])


def probe_args(*extra):
    return ("features.label_columns=[motion,object]", "attentive.epochs=2", "attentive.lrs=[0.001]",
            "attentive.weight_decays=[0.01]", "attentive.batch_size=8", *extra)


def written(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def keys(text):
    """{split: cache key prefix} from the feature lines of a run's output."""
    return {line.split(":")[0]: line.split("key ")[1].rstrip(")") for line in text.splitlines()
            if line.startswith(("train:", "val:")) and "key " in line}


def test_the_motion_set_is_a_clip_source(motion_set):
    layout = find_labelled_source(motion_set, "train")
    assert layout.kind == "clips" and layout.path == motion_set / "train.csv"  # the manifest wins over the folders
    settings = ClipSettings(8, 1, num_clips=2, num_crops=3)
    source = open_labelled_source(motion_set, "train", 32, clips=settings, label_column="motion")
    assert len(source) == 14 and len(source.classes) == 7 and source.num_views == 6
    item = source[0]
    assert item["image"].shape == (6, 3, 8, 32, 32) and item["image"].dtype == torch.float32
    objects = open_labelled_source(motion_set, "train", 32, clips=settings, label_column="object")
    assert [p for p, _ in objects.samples] == [p for p, _ in source.samples] and len(objects.classes) == 2
    one_crop = open_labelled_source(motion_set, "train", 32, clips=ClipSettings(8, 1, num_clips=2),
                                    label_column="motion")
    assert one_crop.fingerprint() != source.fingerprint()  # the crops are part of the feature cache key
    with pytest.raises(LabelledSourceError, match=r"has label columns \['motion', 'object', 'source'\].*"
                                                  r"features.label_columns=\[motion,object\]"):
        open_labelled_source(motion_set, "train", 32, clips=settings)


def test_three_crops_run_along_the_long_side():
    clip = torch.arange(2 * 3 * 4 * 16 * 24, dtype=torch.float64).reshape(2, 3, 4, 16, 24) % 256
    views = ClipCrops(16, 3)(clip.to(torch.uint8))
    assert views.shape == (6, 3, 4, 16, 16)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1, 1)
    for view, (c, left) in enumerate([(c, left) for c in range(2) for left in (0, 4, 8)]):  # clip-major
        expected = (clip[c, ..., left:left + 16].float() / 255 - mean) / std
        torch.testing.assert_close(views[view], expected)
    tall = ClipCrops(16, 3)(clip.transpose(-1, -2).to(torch.uint8))  # 24 x 16: top / centre / bottom
    torch.testing.assert_close(tall[2], (clip.transpose(-1, -2)[0, ..., 8:24, :].float() / 255 - mean) / std)


def test_attentive_reports_motion_and_object(motion_set, checkpoint, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    evaluate("attentive", checkpoint, motion_set, out, cache, *probe_args())
    text = capsys.readouterr().out
    assert "train: 14 videos x 1 view," in text and "val: 8 videos x 1 view," in text
    assert "attentive probe (label motion)" in text and "attentive probe (label object)" in text
    table = text[text.index("label   top-1 % (selected)"):].splitlines()
    assert table[2].startswith("motion") and table[3].startswith("object")
    records = written(out)
    assert len(records) == 8
    for label in LABELS:
        mine = [r for r in records if r["config"]["label"] == label]
        assert {r["metric"] for r in mine} == METRICS and all(0.0 <= r["value"] <= 1.0 for r in mine)
    clips = records[0]["config"]["clips"]  # clip length and step come from the checkpoint's training config
    assert clips == {"frames_per_clip": 8, "frame_step": 1, "num_clips": 1, "num_crops": 1, "num_views": 1}
    one_view = keys(text)

    evaluate("attentive", checkpoint, motion_set, out, cache, *probe_args("features.num_clips=2",
                                                                         "features.num_crops=3"))
    text = capsys.readouterr().out
    assert "train: 14 videos x 6 views, features (14, 6, 64, 96) (extracted" in text
    six_views = keys(text)
    assert six_views["train"] != one_view["train"] and six_views["val"] != one_view["val"]
    last = written(out)[-1]
    assert last["config"]["clips"]["num_views"] == 6 and 0.0 <= last["value"] <= 1.0

    evaluate("attentive", checkpoint, motion_set, out, cache, *probe_args("features.num_clips=2"))
    text = capsys.readouterr().out
    assert "x 2 views" in text and keys(text)["train"] not in (one_view["train"], six_views["train"])
    evaluate("attentive", checkpoint, motion_set, out, cache, *probe_args("features.num_clips=2",
                                                                         "features.num_crops=3"))
    assert "(cache hit, key " + six_views["train"] in capsys.readouterr().out


def test_knn_per_label_on_view_averaged_features(motion_set, checkpoint, tmp_path, capsys):
    evaluate("knn", checkpoint, motion_set, tmp_path / "out", tmp_path / "cache", "knn.ks=[3]",
             "features.label_columns=[motion,object]", "features.num_crops=3")
    text = capsys.readouterr().out
    assert "x 3 views, features (14, 96)" in text and "motion  3" in text and "object  3" in text
    records = written(tmp_path / "out")
    assert {(r["config"]["label"], r["metric"]) for r in records} == {(label, f"top{k}@k=3") for label in LABELS
                                                                      for k in (1, 5)}
    assert all(0.0 <= r["value"] <= 1.0 for r in records)


def test_bad_data_and_settings(motion_set, checkpoint, imagenette_small, tmp_path):
    with pytest.raises(LabelledSourceError, match=r"data '.*nowhere' is neither an image folder \(train/<class>/"
                                                  r"\*.JPEG\) nor a clip source .*: it does not exist"):
        evaluate("attentive", checkpoint, tmp_path / "nowhere", tmp_path / "out", tmp_path / "cache")
    (tmp_path / "notes" / "train" / "a").mkdir(parents=True)
    (tmp_path / "notes" / "train" / "a" / "readme.txt").write_text("no pixels here")
    with pytest.raises(LabelledSourceError, match=r"data '.*notes' is neither .*: the class folders of "
                                                  r"'.*notes/train' hold no images .* and no videos"):
        evaluate("knn", checkpoint, tmp_path / "notes", tmp_path / "out", tmp_path / "cache")
    with pytest.raises(LabelledSourceError, match="none is called 'label'"):
        evaluate("knn", checkpoint, motion_set, tmp_path / "out", tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"is a clip source but encoder 'timm:resnet10t' takes images"):
        evaluate("knn", "timm:resnet10t", motion_set, tmp_path / "out", tmp_path / "cache",
                 "features.label_columns=motion")
    with pytest.raises(ConfigError, match=r"'features.num_crops' is set \(3\) but --data '.*' is an image folder"):
        evaluate("knn", "timm:resnet10t", imagenette_small, tmp_path / "out", tmp_path / "cache",
                 "features.num_crops=3")
    with pytest.raises(LabelledSourceError, match="is an image folder: its one label is the class folder"):
        evaluate("knn", "timm:resnet10t", imagenette_small, tmp_path / "out", tmp_path / "cache",
                 "features.label_columns=motion")
