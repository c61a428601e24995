"""Video clip datasets read with decord: a ``data.labelled.LabelledSource`` for pretraining and evaluation.

Sources:
- a manifest file, one video a line: ``<path> <label>`` (Kinetics / SSv2 lists), or a CSV whose header names a
  ``path`` column and the label column (``label_column``, e.g. ``motion``); paths are relative to the manifest's
  folder or absolute; blank lines and ``#`` comments are passed over;
- a folder with one sub-folder per class: ``<root>/<class>/*.mp4|avi|mkv|webm|mov``.

Labels are ints (``classes`` are then ``'0' .. str(max)``) or class names, mapped to the indices of the sorted names
(or of a given ``classes`` list, so that train and val share one mapping).

Items follow ``data.folder.ImageFolderDataset``: ``source[i]`` or ``source[(index, epoch, batch)]`` (the
``EpochBatchSampler`` key) -> ``{'image': (C, T, H, W) uint8 clip, (num_clips, C, T, H, W) when num_clips > 1, or
None (skipped), 'label': int, 'index': int, 'frames': frame indices (T,) or (num_clips, T) | None}`` plus
``'epoch'``/``'batch'`` with a key, and ``'error'`` (why) for a skipped video. The pixels are called ``'image'`` so
that ``data.collate.MaskCollator`` and ``data.labelled.collate_labelled`` batch clips as they batch images: a batch of
single clips is (B, C, T, H, W) as ``data.batch.Batch`` documents; several clips per video stack to
(B, num_clips, C, T, H, W), which evaluation folds into the batch itself.

Clip sampling: ``frames_per_clip`` frames ``frame_step`` apart, or at ``fps`` frames per second of video time (the
step is converted per video from its native rate). ``sampling='random'`` (pretraining): the video is cut into
``num_clips`` equal parts and each clip starts at a random frame of its part, drawn, with the transform's randomness,
from ``(seed, epoch, index)`` when the item is asked for by a sampler key, so a resumed run replays the same clips and
crops; ``sampling='uniform'`` (evaluation): ``num_clips`` starts evenly spaced (one clip: the middle of the video).

A corrupt or unreadable video, and one shorter than a clip's span (``(frames_per_clip - 1) * step + 1`` frames), is
skipped (``'image'`` None, logged with the file's name; the collator counts it in ``Batch.skipped``) or raises
``CorruptVideoError`` (``TooShortVideoError`` for a short one) naming the file when ``on_corrupt='raise'``.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Callable

import decord
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from .folder import class_folders
from .labelled import LabelledSource
from .transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
SAMPLINGS = ("random", "uniform")
DECODE_ERRORS = (decord.DECORDError, RuntimeError, IndexError, ValueError, OSError)


class CorruptVideoError(RuntimeError):
    """A video could not be read (or is too short for a clip); the message names the file."""


class TooShortVideoError(CorruptVideoError):
    """A video has fewer frames than one clip spans."""


class ManifestError(ValueError):
    """A manifest or class folder is malformed; the message names the file and line."""


# ----------------------------------------------------------------------------------------------------------- sources


def _labels_to_indices(rows: list[tuple[Path, str, str]], classes: list[str] | None) -> tuple[list, list[str]]:
    """rows [(path, raw label, where)] -> ([(path, int label)], classes). ``where`` names the line for errors."""
    if classes is None:
        try:
            ints = [int(raw) for _, raw, _ in rows]
        except ValueError:
            ints = None
        if ints is not None:
            for (_, raw, where), value in zip(rows, ints):
                if value < 0:
                    raise ManifestError(f"{where}: label {raw!r} is negative (expected an index >= 0 or a class name)")
            return [(path, value) for (path, _, _), value in zip(rows, ints)], [str(i) for i in range(max(ints) + 1)]
        classes = sorted({raw for _, raw, _ in rows})
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path, raw, where in rows:
        if raw in index:
            samples.append((path, index[raw]))
        elif raw.isdigit() and int(raw) < len(classes):
            samples.append((path, int(raw)))
        else:
            raise ManifestError(f"{where}: label {raw!r} is not one of the {len(classes)} classes {classes[:8]}"
                                f"{' ...' if len(classes) > 8 else ''}")
    return samples, list(classes)


def read_manifest(path: str | Path, label_column: str = "label", classes: list[str] | None = None,
                  on_missing: str = "raise") -> tuple[list[tuple[Path, int]], list[str]]:
    """[(video path, label index)] and the class names of a manifest file (``<path> <label>`` lines, or a CSV with a
    header naming ``path`` and ``label_column``). ``on_missing='raise'``: a listed file that does not exist is an
    error naming its line; ``'drop'``: such lines are left out (logged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video manifest '{path}' does not exist (expected '<path> <label>' lines or a CSV "
                                f"with a header path,{label_column})")
    lines = path.read_text().splitlines()
    numbered = [(n, line.strip()) for n, line in enumerate(lines, 1)
                if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise ManifestError(f"video manifest '{path}' lists no videos")
    header = [cell.strip() for cell in numbered[0][1].split(",")]
    rows: list[tuple[str, str, str]] = []
    if "path" in header:
        if label_column not in header:
            raise ManifestError(f"{path}:{numbered[0][0]}: CSV header {header} has no label column '{label_column}'")
        at_path, at_label = header.index("path"), header.index(label_column)
        for n, cells in zip((n for n, _ in numbered[1:]), csv.reader(line for _, line in numbered[1:])):
            if len(cells) != len(header):
                raise ManifestError(f"{path}:{n}: {len(cells)} fields, expected {len(header)} ({','.join(header)})")
            rows.append((cells[at_path].strip(), cells[at_label].strip(), f"{path}:{n}"))
    else:
        if label_column != "label":
            raise ManifestError(f"video manifest '{path}' is a '<path> <label>' list, so it has no column "
                                f"'{label_column}' (a CSV with a header path,{label_column} has)")
        for n, line in numbered:
            fields = line.rsplit(None, 1)
            if len(fields) != 2:
                raise ManifestError(f"{path}:{n}: {line!r} is not '<path> <label>'")
            rows.append((fields[0], fields[1], f"{path}:{n}"))
    if on_missing not in ("raise", "drop"):
        raise ValueError(f"on_missing '{on_missing}' is unknown (expected 'raise' or 'drop')")
    resolved, missing = [], []
    for video, raw, where in rows:
        video_path = Path(video) if os.path.isabs(video) else path.parent / video
        if not video_path.is_file():
            if on_missing == "raise":
                raise FileNotFoundError(f"{where}: video '{video_path}' does not exist")
            missing.append(where)
            continue
        resolved.append((video_path, raw, where))
    if missing:
        logger.warning("video manifest '%s': %d listed files do not exist and are left out (first: %s)", path,
                       len(missing), ", ".join(missing[:5]))
    if not resolved:
        raise ManifestError(f"video manifest '{path}' lists no existing videos")
    return _labels_to_indices(resolved, classes)


def scan_video_folder(root: str | Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """[(video path, class index)] and the class names (``classes``, default: the sorted class folders) of
    ``<root>/<class>/*.mp4|avi|mkv|webm|mov``; a broken symlink class folder is an error naming it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder '{root}' does not exist (expected <root>/<class>/*.mp4)")
    names = class_folders(root)
    if not names:
        raise ManifestError(f"video folder '{root}' holds no class folders (expected <root>/<class>/*.mp4)")
    rows = []
    for name in names:
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
        if not files:
            raise ManifestError(f"class folder '{root / name}' holds no videos (expected files ending in "
                                f"{VIDEO_EXTENSIONS})")
        rows += [(file, name, f"{root / name}") for file in files]
    return _labels_to_indices(rows, classes if classes is not None else names)


# -------------------------------------------------------------------------------------------------------- transforms


def video_pretrain_transform(img_size: int, crop_scale=(0.3, 1.0), hflip: bool = False) -> v2.Compose:
    """One random-resized crop (and flip) for every frame of a (T, C, H, W) ``tv_tensors.Video``; stays uint8."""
    return pretrain_transform(img_size, crop_scale, hflip)


def video_eval_transform(img_size: int, normalize: bool = False) -> v2.Compose:
    """Resize the short side to ``img_size`` and center-crop a square, every frame alike; uint8 unless
    ``normalize`` (float, ImageNet statistics, as ``data.transforms.eval_transform`` gives images)."""
    steps = [v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(img_size)]
    if normalize:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


# ----------------------------------------------------------------------------------------------------- clip sampling


def clip_offsets(frames_per_clip: int, step: float) -> torch.Tensor:
    """(T,) frame offsets of a clip from its first frame: ``t * step`` rounded to the nearest frame."""
    return torch.floor(torch.arange(frames_per_clip, dtype=torch.float64) * step + 0.5).long()


def clip_starts(num_frames: int, span: int, num_clips: int, sampling: str) -> torch.Tensor:
    """(num_clips,) first frames of clips ``span`` frames long in a video of ``num_frames`` (>= span) frames.

    ``uniform``: evenly spaced, the gap before the first and after the last half of the gap between two;
    ``random``: clip i starts at a random frame of the i-th of ``num_clips`` equal parts (from the torch RNG)."""
    last = num_frames - span
    if sampling == "uniform":
        return torch.round(torch.arange(num_clips, dtype=torch.float64).add(0.5).mul(last / num_clips)).long()
    low = torch.arange(num_clips) * num_frames // num_clips
    high = torch.minimum((torch.arange(1, num_clips + 1) * num_frames // num_clips) - 1, torch.tensor(last))
    low = torch.minimum(low, high)
    return low + (torch.rand(num_clips, dtype=torch.float64) * (high - low + 1)).long().clamp_max(high - low)


# ----------------------------------------------------------------------------------------------------------- dataset


class VideoClipDataset(LabelledSource):
    """Clips of the videos of a manifest or class folder (see the module docstring).

    ``transform`` takes a (T, C, H, W) ``tv_tensors.Video`` (uint8) and returns one of the same layout
    (``video_pretrain_transform``, ``video_eval_transform``); items hold (C, T, H, W)."""

    def __init__(self, source: str | Path, transform: Callable, *, frames_per_clip: int = 16, frame_step: int = 4,
                 fps: float | None = None, num_clips: int = 1, sampling: str = "random", label_column: str = "label",
                 classes: list[str] | None = None, on_corrupt: str = "skip", on_missing: str = "raise",
                 seed: int = 0, num_threads: int = 1, indices: list[int] | None = None):
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"data.on_corrupt '{on_corrupt}' is unknown (expected 'skip' or 'raise')")
        if sampling not in SAMPLINGS:
            raise ValueError(f"clip sampling '{sampling}' is unknown (expected one of {SAMPLINGS})")
        for name, value in (("frames_per_clip", frames_per_clip), ("frame_step", frame_step),
                            ("num_clips", num_clips), ("num_threads", num_threads)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0 (frames per second of video time) or None, got {fps!r}")
        source = Path(source)
        if source.is_dir():
            samples, self.classes = scan_video_folder(source, classes)
        else:
            samples, self.classes = read_manifest(source, label_column, classes, on_missing)
        self.samples = samples if indices is None else [samples[i] for i in indices]
        self.source, self.transform, self.location = source, transform, str(source)
        self.frames_per_clip, self.frame_step, self.fps = frames_per_clip, frame_step, fps
        self.num_clips, self.sampling = num_clips, sampling
        self.on_corrupt, self.seed, self.num_threads = on_corrupt, seed, num_threads

    def clip_spec(self) -> str:
        """The clip settings, part of every sample's fingerprint record (features depend on them)."""
        rate = f"fps={self.fps}" if self.fps is not None else f"step={self.frame_step}"
        return f"T={self.frames_per_clip}|{rate}|clips={self.num_clips}|{self.sampling}"

    def sample_record(self, sample: tuple) -> str:
        return f"{super().sample_record(sample)}|{self.clip_spec()}"

    def step_for(self, native_fps: float, path: Path) -> float:
        if self.fps is None:
            return float(self.frame_step)
        if not (native_fps > 0 and math.isfinite(native_fps)):
            raise CorruptVideoError(f"video '{path}' reports no frame rate ({native_fps}); cannot sample at "
                                    f"{self.fps} fps")
        return max(native_fps / self.fps, 1.0)

    def frame_indices(self, num_frames: int, native_fps: float, path: Path) -> torch.Tensor:
        """(num_clips, T) frame indices of the clips of a video (draws from the torch RNG when random)."""
        offsets = clip_offsets(self.frames_per_clip, self.step_for(native_fps, path))
        span = int(offsets[-1]) + 1
        if num_frames < span:
            raise TooShortVideoError(f"video '{path}' is too short: {num_frames} frames, a clip of "
                                     f"{self.frames_per_clip} frames spans {span} ({self.clip_spec()})")
        return clip_starts(num_frames, span, self.num_clips, self.sampling)[:, None] + offsets

    def read_clips(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_clips, T, H, W, C) uint8 frames and their (num_clips, T) indices; raises ``CorruptVideoError``."""
        try:
            with decord.bridge.use_torch():
                reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=self.num_threads)
                indices = self.frame_indices(len(reader), reader.get_avg_fps(), path)
                wanted, inverse = torch.unique(indices, return_inverse=True)
                frames = reader.get_batch(wanted.tolist())
        except CorruptVideoError:
            raise
        except DECODE_ERRORS as err:
            raise CorruptVideoError(f"corrupt or unreadable video '{path}': {str(err).strip()[:300]}") from err
        if frames.dim() != 4 or frames.shape[0] != len(wanted):
            raise CorruptVideoError(f"corrupt or unreadable video '{path}': decoded frames of shape "
                                    f"{tuple(frames.shape)} for {len(wanted)} indices")
        return frames[inverse], indices

    def make_clip(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        frames, indices = self.read_clips(path)
        clips = [self.transform(tv_tensors.Video(clip.permute(0, 3, 1, 2))).as_subclass(torch.Tensor)
                 .permute(1, 0, 2, 3).contiguous() for clip in frames]
        if self.num_clips == 1:
            return clips[0], indices[0]
        return torch.stack(clips), indices

    def __getitem__(self, key) -> dict:
        index, epoch, batch = (key, None, None) if isinstance(key, int) else key
        path, label = self.samples[index]
        item = {"image": None, "label": label, "index": index, "frames": None}
        if epoch is not None:
            item.update(epoch=epoch, batch=batch)
        try:
            if epoch is None:
                item["image"], item["frames"] = self.make_clip(path)
            else:
                with torch.random.fork_rng(devices=[]):  # leave the process RNG (dropout, drop-path) untouched
                    torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
                    item["image"], item["frames"] = self.make_clip(path)
        except CorruptVideoError as err:
            if self.on_corrupt == "raise":
                raise
            logger.warning("skipping %s", err)
            item["error"] = str(err)
        return item
