"""Nothing lost, nothing silent (issue 15, inputs / export / labels): export never clobbers, labels follow one class
list per root, every image goes through one decoder whose every failure is a named skip or error, bad settings and
YAML are named."""
import json
import logging
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import train
from data.collate import MaskCollator
from data.folder import IMAGE_EXTENSIONS, CorruptImageError, ImageFolderDataset, load_rgb_uint8
from data.labelled import LabelledSourceError, open_labelled_source
from data.transforms import pretrain_transform
from eval.monitor import build_knn_monitor
from eval.tasks import load_eval_config
from jepa.cli import main as jepa_main
from jepa.config import ConfigError
from jepa import export
from jepa.export import ExportError, export_encoder
from jepa.masks import MultiBlockMaskSampler
from jepa.sections import MonitorConfig

from conftest import TINY, make_subset
from eval_helpers import make_checkpoint

VIT = ("model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.patch_size=8", "data.img_size=32")


def run(root, out, *overrides):
    return train.main(TINY + [f"data.root={root}", f"trainer.output_dir={out}", "trainer.max_steps=2", *overrides])


@pytest.fixture
def tiny_data(tmp_path):
    return make_subset(tmp_path / "data", 2, 1, classes=3)


def first_image(root, split="train"):
    cls = sorted((root / split).iterdir())[0]
    return sorted(cls.iterdir())[0]


def write_corrupt(path):
    path.unlink(missing_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return path


def write_png16(path, pixels):
    """A 16-bit PNG (colour type 2, RGB; or 0, gray, for (H, W)) of ``pixels`` (uint16); PIL cannot write 16-bit RGB."""
    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def write_bomb(source, path):
    """A copy of JPEG ``source`` whose header claims 15000x15000 pixels (PIL's decompression-bomb error)."""
    data = bytearray(source.read_bytes())
    at = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    data[at + 5:at + 9] = (15000).to_bytes(2, "big") * 2
    path.unlink(missing_ok=True)
    path.write_bytes(bytes(data))
    return path


def convert(path, suffix):
    """Replace the image (a symlink) at ``path`` by the same pixels in another format; returns the new path."""
    new = path.with_suffix(suffix)
    pixels = Image.open(path).convert("RGB")
    path.unlink()
    pixels.save(new)
    return new


# ------------------------------------------------------------------------------------------------------ 2. export
@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    make_checkpoint(out, *VIT, step=6)
    return out


def test_export_never_writes_into_a_checkpoint_or_run_folder(vit_run):
    ckpt = vit_run / "checkpoint-00000006"
    before = (ckpt / "model.safetensors").read_bytes()
    for out, overwrite in ((ckpt, False), (ckpt, True), (ckpt / "sub", True), (vit_run, True)):
        with pytest.raises(ExportError, match="never writes"):
            export_encoder(vit_run, "timm", out, overwrite=overwrite)
    with pytest.raises(ExportError, match="checkpoint folder"):
        jepa_main(["export", "--ckpt", str(vit_run), "--to", "timm", "--out", str(ckpt), "--overwrite"])
    assert (ckpt / "model.safetensors").read_bytes() == before and not (ckpt / "sub").exists()
    with pytest.raises(ExportError, match="holds the checkpoint being exported"):
        export_encoder(ckpt, "timm", vit_run.parent, overwrite=True)


@pytest.mark.parametrize("fmt", ["timm", "safetensors"])
def test_export_refuses_a_non_empty_folder_and_overwrite_replaces_it_whole(vit_run, tmp_path, fmt):
    out = tmp_path / "export"
    out.mkdir()
    (out / "encoder.onnx").write_text("an older export")
    with pytest.raises(ExportError, match="is not empty; pass --overwrite"):
        export_encoder(vit_run, fmt, out)
    assert os.listdir(out) == ["encoder.onnx"]
    export_encoder(vit_run, fmt, out, overwrite=True)
    assert "encoder.onnx" not in os.listdir(out) and json.loads((out / "export.json").read_text())["format"] == fmt
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary or old folder left beside it


def test_failed_export_leaves_the_old_folder_and_no_temp(vit_run, tmp_path, monkeypatch):
    out = tmp_path / "export"
    export_encoder(vit_run, "safetensors", out)

    def half_written(encoder, cfg, img_size, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise ExportError("disk full")

    monkeypatch.setitem(export.WRITERS, "timm", half_written)
    with pytest.raises(ExportError, match="disk full"):
        export_encoder(vit_run, "timm", out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.yaml", "encoder.safetensors", "export.json"]
    assert sorted(os.listdir(tmp_path)) == ["export"]


# -------------------------------------------------------------------------------------------- 4. one class list
def without_first_val_class(root):
    """val/ = train/ minus its first class (same files): every val image is its own nearest train image."""
    shutil.rmtree(root / "val")
    for cls in sorted((root / "train").iterdir())[1:]:
        shutil.copytree(cls, root / "val" / cls.name, symlinks=True)
    return sorted(p.name for p in (root / "train").iterdir())


class PatchTokens(nn.Module):
    """(B, 3, H, W) -> (B, N, 3*8*8) raw 8x8 patches: distinct images give distinct pooled features."""

    def forward(self, images):
        return nn.functional.unfold(images, 8, stride=8).transpose(1, 2)


def test_val_missing_a_class_keeps_train_labels(tmp_path):
    root = make_subset(tmp_path / "data", 2, 1, classes=3)
    classes = without_first_val_class(root)
    val = open_labelled_source(root, "val", 32)
    assert val.classes == classes
    assert all(val.classes[label] == path.parent.name for path, label in val.samples)
    monitor = build_knn_monitor(str(root), 32, MonitorConfig(knn_k=1, batch_size=4), 0, 0)
    assert monitor.num_classes == 3 and monitor(PatchTokens(), torch.device("cpu")) == 1.0


def test_eval_knn_with_val_missing_a_class(tmp_path, capsys):
    root = make_subset(tmp_path / "data", 2, 1, classes=3)
    without_first_val_class(root)
    out = tmp_path / "out"
    jepa_main(["eval", "knn", "--encoder", "timm:resnet10t", "--data", str(root), "--out", str(out),
               f"features.cache_dir={tmp_path / 'cache'}", "features.num_workers=0", "features.progress_bar=false",
               "features.img_size=32", "knn.ks=[1]"])
    capsys.readouterr()
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["value"] for r in records if r["metric"] == "top1@k=1"] == [1.0]


def test_val_class_absent_from_train_is_named(tiny_data):
    shutil.copytree(sorted((tiny_data / "val").iterdir())[0], tiny_data / "val" / "n00000001", symlinks=True)
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) \['n00000001'\] of '.*val' are not classes"):
        open_labelled_source(tiny_data, "val", 32)


def test_broken_symlink_class_folder_is_named(tiny_data, tmp_path):
    (tiny_data / "train" / "n00000000").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"class folder '.*n00000000' is a broken symlink"):
        ImageFolderDataset(tiny_data, "train", lambda x: x)
    from data.video import scan_video_folder

    videos = tmp_path / "videos"
    (videos / "a").mkdir(parents=True)
    (videos / "a" / "clip.mp4").write_bytes(b"")
    (videos / "b").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"class folder '.*videos/b' is a broken symlink"):
        scan_video_folder(videos)


# ------------------------------------------------------------------------------------- 6, 7. one decoder, all named
def test_every_listed_extension_decodes(tmp_path):
    pixels = (np.arange(24 * 16 * 3).reshape(16, 24, 3) % 251).astype(np.uint8)
    for suffix in IMAGE_EXTENSIONS:
        path = tmp_path / f"image{suffix}"
        Image.fromarray(pixels).save(path, **({"lossless": True} if suffix == ".webp" else {}))
        decoded = load_rgb_uint8(path)
        assert decoded.dtype == torch.uint8 and decoded.shape == (3, 16, 24), suffix
        if suffix not in (".jpg", ".jpeg"):
            assert torch.equal(decoded, torch.from_numpy(pixels).permute(2, 0, 1)), suffix


def test_16bit_png_decodes_to_uint8_and_batches(tiny_data, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    gray = rgb[..., 0]
    assert torch.equal(load_rgb_uint8(write_png16(tmp_path / "rgb.png", rgb)),
                       torch.from_numpy((rgb >> 8).astype(np.uint8)).permute(2, 0, 1))
    assert torch.equal(load_rgb_uint8(write_png16(tmp_path / "gray.png", gray)),
                       torch.from_numpy((gray >> 8).astype(np.uint8)).expand(3, 20, 30))
    first = first_image(tiny_data)
    first.unlink()
    write_png16(first.with_suffix(".png"), rgb)
    dataset = ImageFolderDataset(tiny_data, "train", pretrain_transform(32), on_corrupt="raise")
    batch = MaskCollator(MultiBlockMaskSampler((4, 4), min_keep=2), seed=0)(
        [dataset[(i, 0, 0)] for i in range(len(dataset))])
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape[0] == len(dataset)


def test_decompression_bomb_is_a_named_skip_or_error(tiny_data, caplog):
    bomb = write_bomb(first_image(tiny_data, "val"), first_image(tiny_data, "val"))
    with pytest.raises(CorruptImageError, match=f"'{bomb}': DecompressionBombError"):
        load_rgb_uint8(bomb)
    source = open_labelled_source(tiny_data, "val", 32, on_corrupt="skip")
    assert source[[p for p, _ in source.samples].index(bomb)]["image"] is None
    assert f"'{bomb}'" in caplog.text


def test_bmp_tiff_16bit_and_bomb_through_training(tiny_data, tmp_path, caplog):
    """The training loader and the kNN monitor read BMP, TIFF and 16-bit PNG; a bomb in val is a logged skip."""
    for i, path in enumerate(sorted(tiny_data.glob("train/*/*"))):
        if i == 0:
            path.unlink()
            write_png16(path.with_suffix(".png"), np.full((40, 40, 3), 40000, np.uint16))
        else:
            convert(path, (".bmp", ".tif")[i % 2])
    bomb = write_bomb(first_image(tiny_data, "val"), first_image(tiny_data, "val"))
    with caplog.at_level(logging.WARNING):
        run(tiny_data, tmp_path / "out", "data.batch_size=3")
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skipped and all(str(bomb) in message for message in skipped)


def test_all_corrupt_val_split_is_named_with_its_count(tiny_data, tmp_path):
    for path in tiny_data.glob("val/*/*"):
        write_corrupt(path)
    with pytest.raises(LabelledSourceError, match=r"every one of the 3 samples of its query \(val\) set '.*val'"):
        run(tiny_data, tmp_path / "out", "data.batch_size=3")


# ---------------------------------------------------------------------------------- 8. on_corrupt reaches the monitor
def test_on_corrupt_raise_reaches_the_knn_monitor(tiny_data, tmp_path):
    bad = write_corrupt(first_image(tiny_data, "val"))
    with pytest.raises(CorruptImageError, match=f"'{bad}'"):
        run(tiny_data, tmp_path / "out", "data.batch_size=3", "data.on_corrupt=raise")


# ------------------------------------------------------------------------------------------------- 9. validation
@pytest.mark.parametrize("task,override,message", [
    ("knn", "knn.temperature=0", "config key 'knn.temperature' must be > 0"),
    ("knn", "features.batch_size=0", "config key 'features.batch_size' must be > 0"),
    ("vl_caption", "vl_caption.decoder.num_heads=3", "config key 'vl_caption.decoder.num_heads' (3) must divide"),
])
def test_bad_eval_config_values(task, override, message):
    with pytest.raises(ConfigError) as info:
        load_eval_config(task, None, [override])
    assert message in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path, tiny_data):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  encoder: vit_tiny\n  depth: [1, 2\ndata:\n  root: x\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad.yaml' is not valid YAML: line 4, column 5"):
        train.main(["--config", str(path)])
    with pytest.raises(ConfigError, match=r"override 'masks.target_scale=\[0.1,': the value is not valid YAML"):
        run(tiny_data, tmp_path / "out", "masks.target_scale=[0.1,")


def test_attentive_heads_must_divide_the_feature_dim():
    from eval.attentive import AttentiveClassifier

    with pytest.raises(ConfigError, match=r"'attentive.num_heads' \(5\) must divide the feature dim 64"):
        AttentiveClassifier(64, 3, num_heads=5)
