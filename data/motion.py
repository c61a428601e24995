"""A labelled video set made from real still images: short clips with a known camera motion.

Each clip is a window moving over a larger resize (``canvas``, twice the clip size by default) of one image:
- ``static``: the window stays put;
- ``pan_left`` / ``pan_right`` / ``pan_up`` / ``pan_down``: the window (the camera) moves ``pan_step`` pixels a frame
  in that direction, so the content moves the opposite way in the frame (``pan_left``: content moves right);
- ``zoom_in`` / ``zoom_out``: the window shrinks / grows by a geometric scale ramp, the content magnified ``zoom``
  times (``zoom_in``) or ``1 / zoom`` times (``zoom_out``) from the first frame to the last. Zoom windows go from
  ``size * zoom ** 0.5`` to ``size / zoom ** 0.5``, so every motion sees the image at the same mean scale.
Windows are resampled with ``torchvision.ops.roi_align`` (a pan or static window is an exact pixel copy); the
window's centre is drawn at random per clip (seeded) wherever the whole motion stays on the canvas.

Written as real video (PyAV: libx264, else mpeg4) under ``<out>/<split>/<object class>/<image>.mp4``, with one CSV
manifest per split, ``<out>/<split>.csv``: ``path,motion,object,source`` (paths relative to ``out``). Read it with
``data.video.VideoClipDataset(out / 'train.csv', ..., label_column='motion', classes=list(MOTIONS))`` (or
``label_column='object'``). The set is deterministic given the seed: which images (``per_class`` of each object
class, ``data.subsets.per_class_choice``), their motions (round-robin over a seeded order, balanced overall and in
every class to within one clip), the window centres and so every rendered frame. The encoded bytes are not always:
libx264 here can code the same frames a few levels apart, depending on what it encoded before.

    python -m data.motion --out DIR --per-class N [--images ../shared/data/imagenette] [--frames 16] [--size 64]
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .folder import load_rgb_uint8, scan_split
from .subsets import per_class_choice

MOTIONS = ("static", "pan_left", "pan_right", "pan_up", "pan_down", "zoom_in", "zoom_out")
# direction the window (camera) moves in, as (x, y) unit steps; the content moves the opposite way
PAN_DIRECTIONS = {"pan_left": (-1, 0), "pan_right": (1, 0), "pan_up": (0, -1), "pan_down": (0, 1)}
CODECS = ("libx264", "mpeg4")
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"
MANIFEST_COLUMNS = ("path", "motion", "object", "source")


@dataclass(frozen=True)
class MotionSpec:
    """Clip geometry: ``frames`` frames of ``size`` x ``size`` pixels drawn from a ``canvas`` x ``canvas`` resize
    (0: twice ``size``); pans move ``pan_step`` pixels a frame, zooms magnify ``zoom`` times over the clip."""

    frames: int = 16
    size: int = 64
    canvas: int = 0
    pan_step: int = 2
    zoom: float = 1.5
    fps: int = 16

    @property
    def canvas_size(self) -> int:
        return self.canvas or 2 * self.size

    def check(self) -> None:
        for name in ("frames", "size", "pan_step", "fps"):
            if getattr(self, name) < 1:
                raise ValueError(f"motion {name} must be >= 1, got {getattr(self, name)}")
        if self.frames < 2:
            raise ValueError(f"motion frames must be >= 2 (a motion needs two frames), got {self.frames}")
        if self.size % 2:
            raise ValueError(f"motion size must be even (yuv420p video), got {self.size}")
        if self.zoom <= 1:
            raise ValueError(f"motion zoom must be > 1 (magnification from first to last frame), got {self.zoom}")
        travel = (self.frames - 1) * self.pan_step
        if self.size + travel > self.canvas_size:
            raise ValueError(f"a pan of {self.frames} frames x {self.pan_step} px needs a canvas of at least "
                             f"{self.size + travel} px for {self.size} px frames, got {self.canvas_size}")
        if self.size * math.sqrt(self.zoom) > self.canvas_size:
            raise ValueError(f"a zoom of {self.zoom} needs a canvas of at least {self.size * math.sqrt(self.zoom):.0f}"
                             f" px for {self.size} px frames, got {self.canvas_size}")


def expected_motion(motion: str, spec: MotionSpec) -> tuple[int, int, float]:
    """(dx, dy, scale) of the content from the first frame to the last, in frame pixels: where a point of the first
    frame's content has moved to (pans), and how much larger it appears (zooms)."""
    if motion not in MOTIONS:
        raise ValueError(f"motion '{motion}' is unknown (expected one of {MOTIONS})")
    travel = (spec.frames - 1) * spec.pan_step
    step_x, step_y = PAN_DIRECTIONS.get(motion, (0, 0))
    scale = {"zoom_in": spec.zoom, "zoom_out": 1 / spec.zoom}.get(motion, 1.0)
    return -step_x * travel, -step_y * travel, scale


def motion_boxes(motion: str, spec: MotionSpec, rng: np.random.Generator) -> torch.Tensor:
    """(frames, 4) windows ``x0, y0, x1, y1`` on the canvas (pixel edges) of one clip, placed at random by ``rng``
    wherever every window stays on the canvas (at integer corners for static and pans: frames are pixel copies)."""
    expected_motion(motion, spec)  # validates the name
    t = np.arange(spec.frames, dtype=np.float64)
    canvas = spec.canvas_size
    if motion.startswith("zoom"):
        sign = 1.0 if motion == "zoom_in" else -1.0
        side = spec.size * spec.zoom ** (sign * (0.5 - t / (spec.frames - 1)))
        half = side.max() / 2
        x0 = rng.uniform(half, canvas - half) - side / 2
        y0 = rng.uniform(half, canvas - half) - side / 2
    else:
        side = np.full_like(t, float(spec.size))
        step_x, step_y = PAN_DIRECTIONS.get(motion, (0, 0))
        corners = []
        for moved in (step_x * spec.pan_step * t, step_y * spec.pan_step * t):
            corners.append(rng.integers(int(-moved.min()), int(canvas - spec.size - moved.max()) + 1) + moved)
        x0, y0 = corners
    return torch.from_numpy(np.stack([x0, y0, x0 + side, y0 + side], 1)).float()


def to_canvas(image: torch.Tensor, canvas: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, canvas, canvas) float32: short side resized to ``canvas``, centre-cropped."""
    if image.shape[-2:] != (canvas, canvas):
        image = F.center_crop(F.resize(image, canvas, interpolation=InterpolationMode.BICUBIC, antialias=True),
                              [canvas, canvas])
    return image.float()


@torch.no_grad()
def render_clip(canvas: torch.Tensor, boxes: torch.Tensor, size: int) -> np.ndarray:
    """(3, C, C) float canvas, (T, 4) windows -> (T, size, size, 3) uint8 frames."""
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
    frames = roi_align(canvas[None], rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return frames.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def choose_codec(codec: str = "auto") -> str:
    """The video encoder to write with: libx264 where PyAV has it, else mpeg4 (or the one named)."""
    names = CODECS if codec == "auto" else (codec,)
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except (ValueError, av.error.FFmpegError):
            continue
    raise RuntimeError(f"no video encoder among {names} in PyAV (codecs available: "
                       f"{sorted(c for c in av.codecs_available if c in ('h264', 'libx264', 'mpeg4', 'libvpx'))})")


def write_video(path: str | Path, frames: np.ndarray, fps: int, codec: str) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames (even H, W) as a one-stream video file (yuv420p, one thread)."""
    options = {"crf": "16", "preset": "veryfast"} if codec == "libx264" else {}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec != "libx264":
            stream.bit_rate = 8 * frames.shape[1] * frames.shape[2] * fps  # ~8 bits a pixel: near lossless
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def assign_motions(labels: list[int], picked: list[int], seed: int) -> list[tuple[int, str]]:
    """[(sample index, motion)] for the picked samples: each class's picks in a seeded order, motions dealt
    round-robin over the classes in turn (balanced overall and per class to within one)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index in picked:
        by_class.setdefault(labels[index], []).append(index)
    out, dealt = [], 0
    for label in sorted(by_class):
        for index in rng.permutation(by_class[label]).tolist():
            out.append((index, MOTIONS[dealt % len(MOTIONS)]))
            dealt += 1
    return out


def make_motion_split(images: str | Path, split: str, out: str | Path, per_class: int, spec: MotionSpec,
                      seed: int = 0, codec: str = "auto") -> Path:
    """Write the clips of one split and its manifest ``<out>/<split>.csv``; returns the manifest's path."""
    spec.check()
    codec = choose_codec(codec)
    images, out = Path(images), Path(out)
    samples, classes = scan_split(images, split)
    labels = [label for _, label in samples]
    picked = per_class_choice(labels, per_class, seed, allow_fewer=True)
    split_seed = zlib.crc32(split.encode())
    rows = []
    for clip, (index, motion) in enumerate(assign_motions(labels, picked, seed + split_seed)):
        path, label = samples[index]
        rng = np.random.default_rng((seed, split_seed, clip))
        frames = render_clip(to_canvas(load_rgb_uint8(path), spec.canvas_size), motion_boxes(motion, spec, rng),
                             spec.size)
        relative = Path(split) / classes[label] / f"{path.stem}.mp4"
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        write_video(out / relative, frames, spec.fps, codec)
        rows.append((relative.as_posix(), motion, classes[label], path.relative_to(images).as_posix()))
    manifest = out / f"{split}.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    return manifest


def make_motion_dataset(images: str | Path, out: str | Path, per_class: int, splits=("train", "val"),
                        spec: MotionSpec = MotionSpec(), seed: int = 0, codec: str = "auto") -> dict[str, Path]:
    """Write every split (see ``make_motion_split``); {split: manifest path}."""
    return {split: make_motion_split(images, split, out, per_class, spec, seed, codec) for split in splits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jepa data make-motion", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES),
                        help="an ImageNet-style folder (<split>/<class>/*.JPEG); default: ../shared/data/imagenette")
    parser.add_argument("--out", required=True, help="folder to write <split>/<class>/*.mp4 and <split>.csv into")
    parser.add_argument("--per-class", type=int, default=10, help="clips per object class and split")
    parser.add_argument("--frames", type=int, default=MotionSpec.frames)
    parser.add_argument("--size", type=int, default=MotionSpec.size, help="frame side in pixels (even)")
    parser.add_argument("--canvas", type=int, default=0, help="side of the resized image the window moves on "
                                                              "(0: twice --size)")
    parser.add_argument("--pan-step", type=int, default=MotionSpec.pan_step, help="pan pixels per frame")
    parser.add_argument("--zoom", type=float, default=MotionSpec.zoom, help="magnification over a zoom clip")
    parser.add_argument("--fps", type=int, default=MotionSpec.fps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--codec", default="auto", help=f"video encoder: auto (first of {CODECS} available) or a "
                                                        "PyAV encoder name")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")
    spec = MotionSpec(args.frames, args.size, args.canvas, args.pan_step, args.zoom, args.fps)
    try:
        spec.check()
        codec = choose_codec(args.codec)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    for split in args.splits:
        start = time.perf_counter()
        manifest = make_motion_split(args.images, split, args.out, args.per_class, spec, args.seed, codec)
        count = sum(1 for _ in open(manifest)) - 1
        print(f"{split}: {count} clips ({spec.frames} x {spec.size}x{spec.size}, {codec}) -> {manifest} "
              f"in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
