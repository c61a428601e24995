"""data.video on real clips (../shared/data/videos): sources, seeded clip sampling, one crop per clip, bad videos."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from data.collate import MaskCollator
from data.motion import choose_codec, write_video
from data.sampler import EpochBatchSampler
from data.video import (CorruptVideoError, ManifestError, TooShortVideoError, VideoClipDataset,
                        video_eval_transform, video_pretrain_transform)
from jepa.masks import MultiBlockMaskSampler

from conftest import REPO

VIDEOS = REPO.parent / "shared" / "data" / "videos"
# frames and native rates of the real clips
BIKES, CARPHONE, BUNNY = "bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"
LENGTHS = {BIKES: 250, CARPHONE: 120, BUNNY: 132}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """A folder of symlinks to the real clips."""
    if not VIDEOS.is_dir():
        raise FileNotFoundError(f"real test data missing: expected video clips at {VIDEOS} (see ../shared/data)")
    folder = tmp_path_factory.mktemp("videos")
    for name in LENGTHS:
        (folder / name).symlink_to(VIDEOS / name)
    return folder


def write_manifest(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def dataset(source, transform=None, **options) -> VideoClipDataset:
    options.setdefault("frames_per_clip", 8)
    options.setdefault("frame_step", 2)
    return VideoClipDataset(source, transform or video_eval_transform(32), **options)


# ----------------------------------------------------------------------------------------------------------- sources


def test_space_manifest_relative_and_absolute_paths(videos):
    manifest = write_manifest(videos / "list.txt", f"# kinetics-style list\n{BIKES} 0\n\n{videos / CARPHONE} 2\n")
    source = dataset(manifest)
    assert [(path.name, label) for path, label in source.samples] == [(BIKES, 0), (CARPHONE, 2)]
    assert source.classes == ["0", "1", "2"] and source.labels == [0, 2] and len(source) == 2


def test_csv_manifest_class_names_label_column_and_given_classes(videos):
    manifest = write_manifest(videos / "list.csv", f"path,kind,label\n{BUNNY},cartoon,1\n{BIKES},street,0\n"
                                                   f"{CARPHONE},cartoon,0\n")
    by_kind = dataset(manifest, label_column="kind")
    assert by_kind.classes == ["cartoon", "street"] and by_kind.labels == [0, 1, 0]
    assert dataset(manifest).labels == [1, 0, 0]  # the 'label' column, ints
    shared = dataset(manifest, label_column="kind", classes=["animal", "cartoon", "street"])
    assert shared.classes == ["animal", "cartoon", "street"] and shared.labels == [1, 2, 1]


def test_class_folders(videos, tmp_path):
    for cls, name in (("street", BIKES), ("street", CARPHONE), ("animation", BUNNY)):
        (tmp_path / cls).mkdir(exist_ok=True)
        (tmp_path / cls / name).symlink_to(videos / name)
    (tmp_path / "street" / "notes.txt").write_text("not a video")
    source = dataset(tmp_path)
    assert source.classes == ["animation", "street"]
    assert [(p.name, label) for p, label in source.samples] == [(BUNNY, 0), (BIKES, 1), (CARPHONE, 1)]


def test_manifest_errors_name_the_file_and_line(videos, tmp_path, caplog):
    bad = write_manifest(tmp_path / "missing.txt", f"{videos / BIKES} 0\n{videos / CARPHONE} 1\nnope.mp4 1\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt:3: video '.*nope\.mp4' does not exist"):
        dataset(bad)
    with caplog.at_level(logging.WARNING, logger="data.video"):
        assert len(dataset(bad, on_missing="drop")) == 2
    assert "missing.txt:3" in caplog.text
    line = write_manifest(tmp_path / "line.txt", f"{videos / BIKES} 0\n{videos / CARPHONE}\n")
    with pytest.raises(ManifestError, match=r"line\.txt:2: .*is not '<path> <label>'"):
        dataset(line)
    negative = write_manifest(tmp_path / "negative.txt", f"{videos / BIKES} -1\n")
    with pytest.raises(ManifestError, match=r"negative\.txt:1: label '-1' is negative"):
        dataset(negative)
    csv = write_manifest(tmp_path / "cols.csv", f"path,object\n{videos / BIKES},street\n")
    with pytest.raises(ManifestError, match=r"cols\.csv:1: CSV header \['path', 'object'\] has no label column "
                                            r"'motion'"):
        dataset(csv, label_column="motion")
    with pytest.raises(ManifestError, match=r"cols\.csv:2: label 'street' is not one of the 2 classes"):
        dataset(csv, label_column="object", classes=["a", "b"])
    fields = write_manifest(tmp_path / "fields.csv", f"path,label\n{videos / BIKES},0,extra\n")
    with pytest.raises(ManifestError, match=r"fields\.csv:2: 3 fields, expected 2"):
        dataset(fields)
    with pytest.raises(ManifestError, match=r"is a '<path> <label>' list, so it has no column 'motion'"):
        dataset(write_manifest(tmp_path / "plain.txt", f"{videos / BIKES} 0\n"), label_column="motion")
    with pytest.raises(FileNotFoundError, match=r"video manifest '.*absent\.txt' does not exist"):
        dataset(tmp_path / "absent.txt")
    (tmp_path / "root" / "empty").mkdir(parents=True)
    with pytest.raises(ManifestError, match=r"class folder '.*empty' holds no videos"):
        dataset(tmp_path / "root")


def test_bad_options_are_errors(videos):
    manifest = write_manifest(videos / "one.txt", f"{BIKES} 0\n")
    for options, message in ((dict(on_corrupt="ignore"), "on_corrupt 'ignore'"), (dict(sampling="dense"),
                             "sampling 'dense'"), (dict(frame_step=0), "frame_step must be"), (dict(fps=0), "fps")):
        with pytest.raises(ValueError, match=message):
            dataset(manifest, **options)


# ----------------------------------------------------------------------------------------------------- clip sampling


def test_random_clips_seeded_by_seed_epoch_index(videos):
    manifest = write_manifest(videos / "bikes.txt", f"{BIKES} 0\n{BUNNY} 1\n")
    source = dataset(manifest, video_pretrain_transform(32, hflip=True), frames_per_clip=8, frame_step=3)
    first = source[(0, 0, 0)]
    again = source[(0, 0, 5)]  # the batch index does not enter the seed: the item replays wherever it falls
    assert torch.equal(first["frames"], again["frames"]) and torch.equal(first["image"], again["image"])
    assert first["epoch"] == 0 and first["batch"] == 0 and first["index"] == 0
    starts = {int(source[(0, epoch, 0)]["frames"][0]) for epoch in range(6)}
    assert len(starts) > 3, f"clip starts barely change across epochs: {starts}"
    other_seed = dataset(manifest, video_pretrain_transform(32, hflip=True), frames_per_clip=8, frame_step=3, seed=1)
    assert [int(other_seed[(0, e, 0)]["frames"][0]) for e in range(6)] != \
        [int(source[(0, e, 0)]["frames"][0]) for e in range(6)]
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    source[(1, 0, 0)]
    assert torch.equal(torch.rand(3), expected), "a keyed item moved the process RNG (dropout, drop-path)"
    assert source[0]["image"].shape == (3, 8, 32, 32)  # an int key draws from the process RNG


def test_frame_count_stride_shape_and_fps(videos):
    manifest = write_manifest(videos / "all.txt", f"{BIKES} 0\n{CARPHONE} 1\n{BUNNY} 2\n")
    source = dataset(manifest, video_pretrain_transform(40), frames_per_clip=8, frame_step=4)
    for index, name in enumerate((BIKES, CARPHONE, BUNNY)):
        item = source[(index, 3, 0)]
        frames = item["frames"]
        assert item["image"].shape == (3, 8, 40, 40) and item["image"].dtype == torch.uint8
        assert frames.shape == (8,) and torch.equal(frames.diff(), torch.full((7,), 4))
        assert 0 <= frames[0] and frames[-1] < LENGTHS[name]
    by_rate = dataset(manifest, frames_per_clip=6, fps=10.0, sampling="uniform")
    for index, name in enumerate((BIKES, CARPHONE)):
        native = decord.VideoReader(str(videos / name)).get_avg_fps()  # 25 and 29.97
        frames = by_rate[index]["frames"]
        offsets = np.floor(np.arange(6) * native / 10.0 + 0.5)
        assert np.array_equal((frames - frames[0]).numpy(), offsets), (name, frames)


def test_uniform_eval_clips_are_evenly_spaced(videos):
    manifest = write_manifest(videos / "carphone.txt", f"{CARPHONE} 0\n")
    source = dataset(manifest, frames_per_clip=8, frame_step=2, num_clips=4, sampling="uniform")
    item = source[(0, 9, 0)]
    assert item["image"].shape == (4, 3, 8, 32, 32) and item["frames"].shape == (4, 8)
    starts = item["frames"][:, 0].double()
    span, last = 15, LENGTHS[CARPHONE] - 15
    gap = last / 4
    assert torch.allclose(starts, (torch.arange(4) + 0.5).double() * gap, atol=0.5)
    assert torch.equal(source[(0, 0, 0)]["frames"], item["frames"])  # uniform clips do not depend on the epoch
    assert int(item["frames"][-1, -1]) - int(item["frames"][0, 0]) + 1 <= LENGTHS[CARPHONE] and span == 15
    middle = dataset(manifest, frames_per_clip=8, frame_step=2, sampling="uniform")[0]["frames"]
    assert int(middle[0]) == round(last / 2)
    parts = dataset(manifest, frames_per_clip=8, frame_step=2, num_clips=3)
    for epoch in range(4):
        starts = parts[(0, epoch, 0)]["frames"][:, 0]
        for part, start in enumerate(starts.tolist()):  # random clip i starts in the i-th third of the video
            assert part * 40 <= start < (part + 1) * 40 and start <= last


# ----------------------------------------------------------------------------------------------------------- crops


def test_eval_transform_equals_cropping_each_decoded_frame(videos):
    manifest = write_manifest(videos / "bikes1.txt", f"{BIKES} 0\n")
    item = dataset(manifest, video_eval_transform(48), frames_per_clip=6, frame_step=5, sampling="uniform")[0]
    decoded = decord.VideoReader(str(videos / BIKES)).get_batch(item["frames"].tolist()).asnumpy()
    for t, frame in enumerate(decoded):
        image = torch.from_numpy(frame).permute(2, 0, 1)
        crop = F.center_crop(F.resize(image, 48, interpolation=InterpolationMode.BICUBIC, antialias=True), [48, 48])
        assert (item["image"][:, t].int() - crop.int()).abs().max() <= 1, t
    normalised = dataset(manifest, video_eval_transform(48, normalize=True), frames_per_clip=6, frame_step=5,
                         sampling="uniform")[0]["image"]
    assert normalised.dtype == torch.float32 and normalised.shape == (3, 6, 48, 48)


def test_one_random_crop_for_every_frame_of_a_clip(videos, tmp_path):
    """A still scene stays still after the random resized crop + flip: every frame got the same crop."""
    still = decord.VideoReader(str(videos / BIKES)).get_batch([100]).asnumpy()[0]  # 272 x 640: even sides
    write_video(tmp_path / "still.mp4", np.repeat(still[None], 24, 0), 25, choose_codec())
    manifest = write_manifest(tmp_path / "still.txt", "still.mp4 0\n")
    source = dataset(manifest, video_pretrain_transform(48, crop_scale=(0.05, 0.3), hflip=True),
                     frames_per_clip=12, frame_step=2)
    clips = [source[(0, epoch, 0)]["image"].float() for epoch in range(6)]
    for clip in clips:
        within = (clip - clip[:, :1]).abs().mean(dim=(0, 2, 3))
        assert within.max() < 2.0, f"frames of one clip differ by {within.tolist()} (different crops per frame)"
    between = min((a[:, 0] - b[:, 0]).abs().mean() for i, a in enumerate(clips) for b in clips[i + 1:])
    assert between > 10, "the random crops of different epochs are alike: the crop is not random"


# ------------------------------------------------------------------------------------------------------- bad videos


@pytest.fixture()
def bad_videos(videos, tmp_path) -> Path:
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(20_000))
    (tmp_path / "truncated.mp4").write_bytes((videos / BIKES).read_bytes()[:100_000])
    for name in (BIKES, CARPHONE):
        (tmp_path / name).symlink_to(videos / name)
    # frames_per_clip 16 x step 10 spans 151 frames: bikes (250) holds a clip, carphone (120) is too short
    return write_manifest(tmp_path / "bad.txt", f"{BIKES} 0\ngarbage.mp4 1\n{CARPHONE} 0\ntruncated.mp4 1\n"
                                                f"{BIKES} 1\n")


def test_corrupt_and_short_videos_are_skipped_counted_and_logged(bad_videos, caplog):
    source = dataset(bad_videos, video_pretrain_transform(32), frames_per_clip=16, frame_step=10)
    with caplog.at_level(logging.WARNING, logger="data.video"):
        items = [source[(i, 0, 0)] for i in range(len(source))]
    assert [item["image"] is None for item in items] == [False, True, True, True, False]
    for name in ("garbage.mp4", "truncated.mp4"):
        assert f"corrupt or unreadable video '{bad_videos.parent / name}'" in caplog.text
    assert f"video '{bad_videos.parent / CARPHONE}' is too short: 120 frames" in caplog.text
    assert "too short" in items[2]["error"] and items[2]["label"] == 0 and items[2]["index"] == 2
    # a whole epoch through the sampler, the DataLoader and the mask collator: skipped items are counted
    sampler = EpochBatchSampler(len(source), batch_size=5, seed=0)
    collate = MaskCollator(MultiBlockMaskSampler((8, 4, 4), num_targets=2, num_context=0, min_keep=2), seed=0)
    loader = torch.utils.data.DataLoader(source, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    with caplog.at_level(logging.ERROR):
        batches = list(loader)
    assert len(batches) == 1
    batch = batches[0]
    assert batch.pixels.shape == (2, 3, 16, 32, 32) and batch.pixels.dtype == torch.uint8
    assert int(batch.skipped) == 3 and batch.labels.tolist() in ([0, 1], [1, 0])
    assert batch.masks[0].context_idx.shape[0] == 2


def test_on_corrupt_raise_names_the_file(bad_videos):
    source = dataset(bad_videos, frames_per_clip=16, frame_step=10, on_corrupt="raise")
    assert source[0]["image"].shape == (3, 16, 32, 32)
    with pytest.raises(CorruptVideoError, match=r"corrupt or unreadable video '.*garbage\.mp4'"):
        source[1]
    with pytest.raises(TooShortVideoError, match=r"video '.*carphone_pristine\.mp4' is too short: 120 frames, a "
                                                 r"clip of 16 frames spans 151"):
        source[(2, 0, 0)]
    with pytest.raises(CorruptVideoError, match=r"truncated\.mp4"):
        source[3]


# ---------------------------------------------------------------------------------------------- labelled source


def test_fingerprint_follows_the_clip_settings_and_subset_keeps_classes(videos):
    manifest = write_manifest(videos / "fp.txt", f"{BIKES} 0\n{CARPHONE} 1\n{BUNNY} 2\n")
    base = dataset(manifest, sampling="uniform")
    assert base.fingerprint() == dataset(manifest, sampling="uniform").fingerprint()
    for options in (dict(frame_step=3), dict(fps=8.0), dict(num_clips=2), dict(frames_per_clip=4)):
        assert dataset(manifest, sampling="uniform", **options).fingerprint() != base.fingerprint(), options
    part = base.subset([2, 0])
    assert part.classes == base.classes and part.labels == [2, 0] and part[0]["label"] == 2
