"""``data.decode=device``: JPEG bytes and crop boxes out of the workers, decoded and cropped by the device transform.

The same (seed, epoch, index) gets the same crop and flip as ``data.decode=cpu``, pixels within a few /255, the same
masks and labels; bad files are named (or skipped and counted); ``jepa data reencode`` builds the square JPEG folder
the GPU benchmark reads; training through train.py runs and resumes exactly. CPU only: the device is the CPU here.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import train
from data.batch import Batch, EncodedImages
from data.collate import MaskCollator
from data.device_decode import DeviceJpegDecode
from data.folder import CorruptImageError, ImageFolderDataset, load_rgb_uint8
from data.jpeg_crop import CroppedJpeg, JpegCropParams, read_jpeg
from data.loaders import build_pretrain_loader, pipeline_device_transform
from data.reencode import reencode_folder
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, DeviceNormalize, pretrain_transform
from eval.health_plot import read_scalars
from jepa.checkpoint import CheckpointError
from jepa.cli import main as jepa_main
from jepa.config import ConfigError, load_config
from jepa.masks import MultiBlockMaskSampler
from jepa.methods import get_method

from conftest import REPO, TINY, make_subset, tiny_config
from test_train_e2e import assert_same_weights

SEED = 3
CROP_SCALE = (0.3, 1.0)
# decode=device (roi_align, bilinear + area bins) vs decode=cpu (antialiased bicubic, rounded to uint8), in /255:
# measured on these Imagenette crops at 32 px, about 1.7 on average and up to 3.5 for one image; a crop box or flip
# drawn differently gives 10-40
MEAN_DIFF_BOUND = 2.5
IMAGE_DIFF_BOUND = 4.5


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """2 classes x 4 real Imagenette train images (128 px squares) plus, in the first class, a grayscale JPEG, a wide
    200x40 JPEG (RandomResizedCrop's central fallback crop) and a tall 96x160 one: three image sizes in one batch and
    both colour modes the device decodes."""
    root = make_subset(tmp_path_factory.mktemp("jpegs"), 4, 1, classes=2)
    first_class = sorted((root / "train").iterdir())[0]
    with Image.open(sorted(first_class.iterdir())[0]) as image:
        image.convert("L").save(first_class / "zz_gray.JPEG", quality=90)
        image.resize((200, 40), Image.BICUBIC).save(first_class / "zz_wide.JPEG", quality=90)
        image.resize((96, 160), Image.BICUBIC).save(first_class / "zz_tall.JPEG", quality=90)
    return root


@pytest.fixture
def small_folder(tmp_path) -> Path:
    """2 classes x 2 real train images (symlinks), 1 val image each; free to add bad files to."""
    return make_subset(tmp_path / "data", 2, 1, classes=2)


def first_class(root: Path) -> Path:
    return sorted((root / "train").iterdir())[0]


def a_real_jpeg(root: Path) -> Path:
    return sorted(first_class(root).iterdir())[0]


def record_cpu_draws(transform: v2.Compose) -> list[list]:
    """Make ``pretrain_transform``'s own RandomResizedCrop and RandomHorizontalFlip record what they draw: one
    ``[(x1, y1, x2, y2), flipped]`` per call (the flip's ``make_params`` runs only when it flips)."""
    crop, flip = transform.transforms
    draws: list[list] = []

    def crop_params(flat_inputs):
        params = v2.RandomResizedCrop.make_params(crop, flat_inputs)
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        draws.append([(float(left), float(top), float(left + width), float(top + height)), False])
        return params

    def flip_params(flat_inputs):
        draws[-1][1] = True
        return v2.RandomHorizontalFlip.make_params(flip, flat_inputs)

    crop.make_params, flip.make_params = crop_params, flip_params
    return draws


def device_dataset(root: Path, on_corrupt: str = "skip") -> ImageFolderDataset:
    return ImageFolderDataset(root, "train", JpegCropParams(CROP_SCALE, hflip=True), on_corrupt=on_corrupt, seed=SEED,
                              decoder=read_jpeg)


def collate(items: list) -> Batch:
    return MaskCollator(MultiBlockMaskSampler((4, 4), min_keep=2), seed=SEED)(items)


def diff_255(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute difference of two normalised (B, 3, H, W) batches, in /255 of the raw pixels."""
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((a - b) * std * 255).abs().mean((1, 2, 3))


def assert_same_masks(masks_a, masks_b, rows=None):
    assert len(masks_a) == len(masks_b)
    for a, b in zip(masks_a, masks_b):
        for name in ("context_idx", "context_pad", "target_idx", "target_pad"):
            expected = getattr(b, name)
            if expected is not None and rows is not None:
                expected = expected[rows]
            actual = getattr(a, name)
            assert (actual is None) == (expected is None), name
            if actual is not None:
                assert torch.equal(actual, expected), name


def losses_of(out: str) -> list[float]:
    return [float(line.split("loss ")[1].split()[0]) for line in out.splitlines()
            if line.startswith("step ") and " loss " in line]


def train_args(root, out, *overrides) -> list[str]:
    return TINY + [f"data.root={root}", f"trainer.output_dir={out}", "monitor.knn_every=0", *overrides]


# ------------------------------------------------------------------------------- 1. same draws, close pixels
def test_device_crop_box_and_flip_are_the_cpu_paths_draws(jpeg_folder):
    transform = pretrain_transform(32, CROP_SCALE, hflip=True)
    draws = record_cpu_draws(transform)
    cpu = ImageFolderDataset(jpeg_folder, "train", transform, seed=SEED)
    device = device_dataset(jpeg_folder)
    boxes = {}
    for epoch in (0, 1):
        for index in range(len(device)):
            cpu_image = cpu[(index, epoch, 0)]["image"]
            assert cpu_image.shape == (3, 32, 32) and cpu_image.dtype == torch.uint8
            cropped = device[(index, epoch, 0)]["image"]
            assert isinstance(cropped, CroppedJpeg)
            assert (cropped.box, cropped.flip) == tuple(draws[-1]), (index, epoch)
            assert device[(index, epoch, 0)]["image"][1:3] == (cropped.box, cropped.flip)  # replays exactly
            boxes[index, epoch] = cropped.box
    flips = [flip for _, flip in draws]
    assert any(flips) and not all(flips)
    assert len(set(boxes.values())) > len(device)  # epochs draw new crops
    wide = [i for i, (path, _) in enumerate(device.samples) if path.name == "zz_wide.JPEG"][0]
    assert boxes[wide, 0] == (73.0, 0.0, 126.0, 40.0)  # the central 4:3 fallback of a 5:1 image
    width, height = 128, 128
    square = [box for (i, _), box in boxes.items() if device.samples[i][0].name[:3] != "zz_"]
    assert all(0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height for x1, y1, x2, y2 in square)
    assert any((x2 - x1) * (y2 - y1) < 0.9 * width * height for x1, y1, x2, y2 in square)


def first_epoch(root: Path, decode: str, tmp_path: Path) -> tuple[list[Batch], object]:
    cfg = tiny_config("data.hflip=true", "data.batch_size=4", f"data.decode={decode}", f"trainer.seed={SEED}",
                      root=root, output_dir=tmp_path)
    spec = get_method(cfg.method)
    loader, sampler = build_pretrain_loader(spec.pipeline, cfg, spec.build(cfg), pin_memory=False)
    sampler.set_position(0, 0)
    return list(loader), pipeline_device_transform(spec.pipeline, cfg)


def test_device_decoded_pixels_are_close_to_cpu_with_the_same_masks_and_labels(jpeg_folder, tmp_path):
    cpu_batches, normalize = first_epoch(jpeg_folder, "cpu", tmp_path)
    device_batches, decode = first_epoch(jpeg_folder, "device", tmp_path)
    assert isinstance(normalize, DeviceNormalize) and isinstance(decode, DeviceJpegDecode)
    assert len(cpu_batches) == len(device_batches) == 2
    cpu_pixels, device_pixels = [], []
    for cpu_batch, device_batch in zip(cpu_batches, device_batches):
        assert device_batch.pixels is None and len(device_batch) == len(cpu_batch) == 4
        assert torch.equal(cpu_batch.labels, device_batch.labels)
        assert_same_masks(device_batch.masks, cpu_batch.masks)
        decoded = decode(device_batch.to("cpu"))
        assert decoded.encoded is None and decoded.pixels.shape == (4, 3, 32, 32)
        assert decoded.pixels.dtype == torch.float32 and int(decoded.skipped) == 0
        assert torch.equal(decoded.labels, cpu_batch.labels)
        assert_same_masks(decoded.masks, cpu_batch.masks)
        cpu_pixels.append(normalize(cpu_batch).pixels)
        device_pixels.append(decoded.pixels)
    cpu_pixels, device_pixels = torch.cat(cpu_pixels), torch.cat(device_pixels)
    per_image = diff_255(cpu_pixels, device_pixels)
    assert per_image.mean() <= MEAN_DIFF_BOUND and per_image.max() <= IMAGE_DIFF_BOUND, per_image
    # the bounds tell a crop flipped the other way (or shifted) from the right one
    assert diff_255(cpu_pixels, device_pixels.flip(-1)).mean() > 2 * IMAGE_DIFF_BOUND


def test_mixed_sizes_and_grayscale_decode_like_the_cpu_path(jpeg_folder):
    device = device_dataset(jpeg_folder)
    cpu = ImageFolderDataset(jpeg_folder, "train", pretrain_transform(32, CROP_SCALE, hflip=True), seed=SEED)
    odd = [i for i, (path, _) in enumerate(device.samples) if path.name.startswith("zz_")] + [0]
    batch = collate([device[(i, 2, 5)] for i in odd])  # 4 rows, 4 sizes or modes: one roi_align per size
    decoded = DeviceJpegDecode(32)(batch)
    expected = DeviceNormalize().normalize(torch.stack([cpu[(i, 2, 5)]["image"] for i in odd]).float() / 255)
    per_image = diff_255(expected, decoded.pixels)
    assert per_image.max() <= IMAGE_DIFF_BOUND, per_image
    gray = decoded.pixels[0] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert device.samples[odd[0]][0].name == "zz_gray.JPEG"
    torch.testing.assert_close(gray[0], gray[1])  # a grayscale JPEG decodes to R = G = B
    torch.testing.assert_close(gray[0], gray[2])


# ------------------------------------------------------------------------------------- 2. the batch type
def test_encoded_images_pack_and_files_round_trip():
    files = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in (5, 0, 17)]
    boxes = [(0.0, 1.0, 10.0, 12.0), (2.5, 3.0, 4.0, 5.5), (1.0, 1.0, 2.0, 2.0)]
    encoded = EncodedImages.pack(files, boxes, [True, False, True], ["a.JPEG", "b.JPEG", "c.JPEG"])
    assert len(encoded) == 3 and encoded.paths == ["a.JPEG", "b.JPEG", "c.JPEG"]
    assert encoded.data.shape == (22,) and encoded.offsets.tolist() == [0, 5, 5, 22]
    assert all(torch.equal(a, b) for a, b in zip(encoded.files(), files))
    assert encoded.boxes.dtype == torch.float32 and encoded.boxes.shape == (3, 5)
    assert encoded.boxes[:, 0].tolist() == [0, 1, 2] and encoded.boxes[:, 1:].tolist() == [list(b) for b in boxes]
    assert encoded.flips.dtype == torch.bool and encoded.flips.tolist() == [True, False, True]


def encoded_batch(root: Path) -> Batch:
    dataset = device_dataset(root)
    return collate([dataset[(i, 0, 0)] for i in range(len(dataset))])


def test_batch_to_moves_boxes_flips_and_masks_but_keeps_the_bytes_on_the_host(small_folder):
    batch = encoded_batch(small_folder)
    assert batch.pixels is None and len(batch) == 4 and batch.encoded.data.dtype == torch.uint8
    moved = batch.to("meta")  # any device but the host's
    assert moved.encoded.data.device.type == "cpu" and moved.encoded.offsets.device.type == "cpu"
    assert moved.encoded.data.data_ptr() == batch.encoded.data.data_ptr()  # not even copied
    assert moved.encoded.boxes.is_meta and moved.encoded.flips.is_meta
    assert moved.labels.is_meta and moved.skipped.is_meta and moved.masks[0].context_idx.is_meta
    assert moved.encoded.paths == batch.encoded.paths and len(moved) == 4
    assert batch.encoded.boxes.device.type == "cpu"  # the original is left as it was


def pin_memory_works() -> bool:
    try:
        torch.empty(1).pin_memory()
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not pin_memory_works(), reason="pinned memory needs an accelerator, none here")
def test_pin_memory_pins_boxes_and_flips_not_the_bytes(small_folder):
    pinned = encoded_batch(small_folder).pin_memory()
    assert pinned.encoded.boxes.is_pinned() and pinned.encoded.flips.is_pinned() and pinned.labels.is_pinned()
    assert not pinned.encoded.data.is_pinned()


def test_pin_memory_leaves_the_bytes_alone(small_folder, monkeypatch):
    """What ``Batch.pin_memory`` asks to pin, where no accelerator allows pinning: a stand-in records it."""
    batch = encoded_batch(small_folder)
    pinned_ptrs = []

    def fake_pin(tensor, *args, **kwargs):
        pinned_ptrs.append(tensor.data_ptr())
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    pinned = batch.pin_memory()
    assert batch.encoded.boxes.data_ptr() in pinned_ptrs and batch.encoded.flips.data_ptr() in pinned_ptrs
    assert batch.labels.data_ptr() in pinned_ptrs and batch.masks[0].context_idx.data_ptr() in pinned_ptrs
    assert batch.encoded.data.data_ptr() not in pinned_ptrs
    assert pinned.encoded.data.data_ptr() == batch.encoded.data.data_ptr()
    assert torch.equal(pinned.encoded.boxes, batch.encoded.boxes)


# ---------------------------------------------------------------------------------------- 3. bad inputs
def test_png_under_device_decode_is_named_with_the_fix(small_folder):
    png = first_class(small_folder) / "not_a_jpeg.png"
    with Image.open(a_real_jpeg(small_folder)) as image:
        image.save(png)
    with pytest.raises(CorruptImageError, match=r"image '.*not_a_jpeg\.png' is not a JPEG file.*jepa data reencode"):
        read_jpeg(png)
    dataset = device_dataset(small_folder, on_corrupt="raise")
    index = [path for path, _ in dataset.samples].index(png)
    with pytest.raises(CorruptImageError, match=r"not_a_jpeg\.png.*data\.decode=cpu.*jepa data reencode"):
        dataset[(index, 0, 0)]
    batch = collate([device_dataset(small_folder)[(i, 0, 0)] for i in range(len(dataset))])
    assert int(batch.skipped) == 1 and len(batch) == len(dataset) - 1 and str(png) not in batch.encoded.paths


def test_cmyk_jpeg_is_a_clear_error_on_the_device_path_only(small_folder):
    cmyk = first_class(small_folder) / "cmyk.JPEG"
    with Image.open(a_real_jpeg(small_folder)) as image:
        image.convert("CMYK").save(cmyk, quality=90)
    with pytest.raises(CorruptImageError, match=r"image '.*cmyk\.JPEG' is a CMYK JPEG file.*jepa data reencode"):
        read_jpeg(cmyk)
    assert load_rgb_uint8(cmyk).shape == (3, 128, 128)  # decode=cpu reads it


def write_bad_body(source: Path, path: Path, kind: str) -> Path:
    """A copy of JPEG ``source`` whose header is intact (PIL reads format, mode and size) but whose entropy-coded
    data is cut in half (``truncated``) or overwritten with random bytes (``garbage``)."""
    data = source.read_bytes()
    if kind == "truncated":
        bad = data[:len(data) // 2]
    else:
        start = data.index(b"\xff\xda") + 20
        body = np.random.default_rng(0).integers(0, 256, len(data) - 2 - start, dtype=np.uint8).tobytes()
        bad = data[:start] + body + data[-2:]
    path.write_bytes(bad)
    return path


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_jpeg_with_a_bad_body_is_skipped_and_counted_on_the_device(small_folder, caplog, kind):
    bad = write_bad_body(a_real_jpeg(small_folder), first_class(small_folder) / "bad_body.JPEG", kind)
    assert read_jpeg(bad).height == 128  # the header passes: only the decoder finds it
    dataset = device_dataset(small_folder)
    items = [dataset[(i, 0, 0)] for i in range(len(dataset))]
    batch = collate(items)
    row = batch.encoded.paths.index(str(bad))
    keep = [r for r in range(len(batch)) if r != row]
    decoded = DeviceJpegDecode(32, "skip")(batch.to("cpu"))
    assert int(decoded.skipped) == 1 and decoded.encoded is None
    assert decoded.pixels.shape == (len(batch) - 1, 3, 32, 32) and len(decoded) == len(batch) - 1
    assert torch.equal(decoded.labels, batch.labels[keep])
    assert_same_masks(decoded.masks, batch.masks, rows=keep)
    # the rows kept are the images they were: decoding the good files alone gives the same pixels
    alone = DeviceJpegDecode(32)(collate([item for i, item in enumerate(items) if i != row]))
    torch.testing.assert_close(decoded.pixels, alone.pixels)
    assert "bad_body.JPEG" in caplog.text and "skipping" in caplog.text
    with pytest.raises(CorruptImageError, match=r"corrupt or unreadable image '.*bad_body\.JPEG': the JPEG decoder"):
        DeviceJpegDecode(32, "raise")(batch)


def test_a_batch_with_no_decodable_file_is_an_error(small_folder):
    bad = [write_bad_body(a_real_jpeg(small_folder), small_folder / f"bad{i}.JPEG", "truncated") for i in range(2)]
    crop = JpegCropParams(CROP_SCALE)
    items = [{"image": crop(read_jpeg(path)), "label": 0} for path in bad]
    with pytest.raises(RuntimeError, match="every image of a batch of 2 failed to decode"):
        DeviceJpegDecode(32)(collate(items))


def test_training_skips_and_counts_a_bad_jpeg_or_names_it(small_folder, tmp_path):
    bad = write_bad_body(a_real_jpeg(small_folder), first_class(small_folder) / "bad_body.JPEG", "truncated")
    common = ("data.decode=device", "data.batch_size=5", "trainer.max_steps=2", "trainer.checkpoint_every=0")
    train.main(train_args(small_folder, tmp_path / "skip", *common))
    steps, skipped = read_scalars(tmp_path / "skip")["train/skipped"]
    assert steps == [1, 2] and skipped == [1.0, 1.0]  # every batch holds all 5 files, the bad one among them
    with pytest.raises(CorruptImageError, match=f"'{bad}'"):
        train.main(train_args(small_folder, tmp_path / "raise", *common, "data.on_corrupt=raise"))


def test_device_decode_with_a_pipeline_that_lacks_it_is_a_config_error(small_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"'data\.decode' is 'device' but the 'multicrop_images' pipeline of method "
                                          r"'lejepa' implements \['cpu'\] only"):
        train.main(["--config", str(REPO / "configs/lejepa/tiny_cpu.yaml"), "data.decode=device", "data.num_workers=0",
                    f"data.root={small_folder}", f"trainer.output_dir={tmp_path}", "trainer.max_steps=1"])
    cfg = load_config(None, ["method=vjepa", "data.decode=device"])
    pipeline = get_method("vjepa").pipeline
    with pytest.raises(ConfigError, match=r"'data\.decode' is 'device'.*'masked_clips'.*implemented by "
                                          r"\['masked_images'\]"):
        pipeline_device_transform(pipeline, cfg)
    with pytest.raises(ConfigError, match=r"'data\.decode'"):
        build_pretrain_loader(pipeline, cfg, parts=None)
    with pytest.raises(ConfigError, match=r"config key 'data\.decode' is 'gpu'; expected one of \['cpu', 'device'\]"):
        tiny_config("data.decode=gpu")


# --------------------------------------------------------------------------------------------- 4. reencode
def relative_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_reencode_writes_square_jpegs_in_the_same_layout_and_resumes(small_folder, tmp_path, caplog):
    png = first_class(small_folder) / "was_a_png.png"
    with Image.open(a_real_jpeg(small_folder)) as image:
        image.resize((90, 60)).save(png)  # not square, not a JPEG
    (first_class(small_folder) / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "out"
    report = reencode_folder(small_folder, out, size=48, quality=85, workers=0)
    sources = relative_files(small_folder) - {str(png.relative_to(small_folder))}
    expected = (sources | {str(png.relative_to(small_folder).with_suffix(".JPEG"))}) - {
        str((first_class(small_folder) / "broken.JPEG").relative_to(small_folder))}
    assert relative_files(out) == expected and len(expected) == 7  # 2 classes x (2 train + 1 val) + the PNG
    assert report.written == 7 and report.existing == 0 and len(report.unreadable) == 1
    assert "broken.JPEG" in report.unreadable[0] and "broken.JPEG" in caplog.text
    for path in out.rglob("*.JPEG"):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48)), path
        assert read_jpeg(path).height == 48  # what data.decode=device reads
    # the pixels: the centre crop of the source, shorter side resized to 48
    source = load_rgb_uint8(png).float()  # 90x60 -> 72x48 -> centre 48x48
    resized = v2.functional.resize(source, 48, antialias=True)
    centre = v2.functional.center_crop(resized, [48, 48])
    written = load_rgb_uint8(out / png.relative_to(small_folder).with_suffix(".JPEG")).float()
    assert (written - centre).abs().mean() < 6
    # resumable: nothing rewritten, a deleted file (and only it) written again, a killed run's temporary removed
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.JPEG")}
    again = reencode_folder(small_folder, out, size=48, quality=85, workers=0)
    assert (again.written, again.existing, len(again.unreadable)) == (0, 7, 1)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.JPEG")} == mtimes
    removed = sorted(mtimes)[0]
    removed.unlink()
    stale = removed.parent / f".{removed.name}.123.tmp"
    stale.write_bytes(b"half a file")
    third = reencode_folder(small_folder, out, size=48, quality=85, workers=0)
    assert (third.written, third.existing) == (1, 6) and removed.is_file() and not stale.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p != removed)


def test_jepa_data_reencode_cli(small_folder, tmp_path, capsys):
    out = tmp_path / "square"
    jepa_main(["data", "reencode", "--src", str(small_folder), "--out", str(out), "--size", "40", "--quality", "80",
               "--workers", "2", "--splits", "train"])
    printed = capsys.readouterr().out
    assert f"reencoded {small_folder} -> {out}: 4 written, 0 already there, 0 unreadable" in printed
    assert relative_files(out) == {f for f in relative_files(small_folder) if f.startswith("train/")}
    for path in out.rglob("*.JPEG"):
        with Image.open(path) as image:
            assert image.size == (40, 40)
    jepa_main(["data", "reencode", "--src", str(small_folder), "--out", str(out), "--size", "40", "--workers", "0",
               "--splits", "train"])
    assert "0 written, 4 already there" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        jepa_main(["data", "reencode", "--src", str(small_folder), "--out", str(out), "--splits", "test"])
    assert exit_info.value.code == 2 and "has no 'test/' folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 5. end to end
def test_training_with_device_decode_follows_the_cpu_run(imagenette_small, tmp_path, capsys):
    common = ("trainer.max_steps=12", "optim.lr=2e-3", "optim.warmup_steps=3", "loss.kind=l2", "data.hflip=true",
              "trainer.checkpoint_every=0")
    curves = {}
    for decode in ("cpu", "device"):
        train.main(train_args(imagenette_small, tmp_path / decode, *common, f"data.decode={decode}"))
        curves[decode] = losses_of(capsys.readouterr().out)
    cpu, device = curves["cpu"], curves["device"]
    assert len(device) == 12 and all(math.isfinite(v) for v in device)
    assert np.mean(device[-3:]) < 0.8 * np.mean(device[:3]), device
    # the same crops, flips and masks, pixels within ~2/255: the same run to within a fraction of a percent
    assert np.allclose(device, cpu, rtol=0.01), (device, cpu)


def test_device_decode_resume_is_exact(imagenette_small, tmp_path):
    common = ("data.decode=device", "data.hflip=true", "trainer.checkpoint_every=2", "optim.schedule_steps=4",
              "model.drop_path=0.1")
    train.main(train_args(imagenette_small, tmp_path / "full", *common, "trainer.max_steps=4"))
    train.main(train_args(imagenette_small, tmp_path / "split", *common, "trainer.max_steps=2"))
    train.main(train_args(imagenette_small, tmp_path / "split", *common, "trainer.max_steps=4"))
    assert_same_weights(tmp_path / "full" / "checkpoint-00000004", tmp_path / "split" / "checkpoint-00000004")
    state = json.loads((tmp_path / "split" / "checkpoint-00000004" / "train_state.json").read_text())
    assert state["step"] == 4
    # decode=cpu resamples the pixels (bicubic, not bilinear): not the same run, so resuming with it fails loudly
    switched = [arg.replace("data.decode=device", "data.decode=cpu") for arg in common]
    with pytest.raises(CheckpointError, match=r"data\.decode: checkpoint 'device' vs now 'cpu'"):
        train.main(train_args(imagenette_small, tmp_path / "split", *switched, "trainer.max_steps=6"))


# --------------------------------------------------------------------------------------------- 6. benchmark
def test_data_pipeline_benchmark_smoke_run_on_the_cpu(small_folder, tmp_path):
    root, out = tmp_path / "square", tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_pipeline.py"), "--root", str(root),
                           "--make-from", str(small_folder), "--size", "48", "--model", "tiny", "--workers", "0",
                           "--decode", "cpu,device", "--pin", "off", "--batch-size", "2", "--steps", "2", "--warmup",
                           "1", "--loader-batches", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "CPU smoke run" in done.stdout and "| device | 0 | False |" in done.stdout
    result = json.loads(out.read_text())
    assert result["images"] == 4 and result["reencode"]["written"] == 4
    assert [r["decode"] for r in result["loader"]] == [r["decode"] for r in result["train"]] == ["cpu", "device"]
    assert all(r["img_s"] > 0 and math.isfinite(r["ms_per_step"]) for r in result["train"])
    assert result["cached_step"]["ms_per_step"] > 0
