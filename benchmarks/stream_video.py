"""Synthetic video streams for the selective-decoding benchmark: still images shown one after another, each for a
random 2-8 s, with a slow camera motion (a crop window panning and zooming over the image), written as a real mp4.

    segments = write_stream(paths, Path("out/stream0.mp4"), fps=10, size=128, seed=0)
    segments[i] -> Segment(start, end, image_index)   seconds; image_index indexes ``paths``
    read_segments(Path("out/stream0.mp4")) -> the same list, from the JSON sidecar ``out/stream0.json``

Durations are whole frames (``round(d * fps)`` for ``d`` drawn uniformly in [min_s, max_s]), so the segments tile
``[0, frames / fps)`` exactly: ``segments[0].start == 0``, ``segments[i].end == segments[i + 1].start`` and the last
end is the video's duration. Everything random (durations, motion paths) comes from ``numpy.random.default_rng(seed)``,
drawn in a fixed order: the same seed and images give the same frames.

Encoded as H.264 (PyAV ``libx264``, yuv420p); where that encoder is missing or fails to open, MPEG-4 part 2
(``mpeg4``) at a high quality. ``size`` must be even (yuv420p); decord 0.6 reads 32, 64, 80, 96, 128 px back but
fails on 48 px frames (a copy-size check inside decord), so prefer multiples of 16 other than 48.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

# The crop window's side as a fraction of the image's short side: zooms move between these.
MIN_CROP, MAX_CROP = 0.6, 0.95
# Encoders tried in order, with their options: H.264, then MPEG-4 part 2 where libx264 is missing.
CODECS = (("libx264", {"crf": "18", "preset": "veryfast"}), ("mpeg4", {"qscale": "3"}))


@dataclass(frozen=True)
class Segment:
    start: float  # seconds, inclusive
    end: float  # seconds, exclusive
    image_index: int  # index into the images given to write_stream


def sidecar_path(video: Path) -> Path:
    return Path(video).with_suffix(".json")


def segment_durations(count: int, fps: float, rng: np.random.Generator, min_s: float, max_s: float) -> list[int]:
    """``count`` segment lengths in frames, each ``round(uniform(min_s, max_s) * fps)`` (at least one frame)."""
    return [max(1, round(float(rng.uniform(min_s, max_s)) * fps)) for _ in range(count)]


def _ease(u: np.ndarray) -> np.ndarray:
    """Smooth 0 -> 1 over u in [0, 1], zero velocity at both ends (the camera starts and stops gently)."""
    return 0.5 - 0.5 * np.cos(math.pi * u)


def crop_path(width: int, height: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, 4) crop boxes (left, top, right, bottom), float pixels, of a square window that pans between two
    random centres and zooms between two random sizes (``MIN_CROP``..``MAX_CROP`` of the short side); every box lies
    inside the ``width`` x ``height`` image."""
    short = min(width, height)
    sides = rng.uniform(MIN_CROP, MAX_CROP, size=2) * short
    # Each end's centre is drawn where a window of that end's side fits; the eased path between two valid boxes
    # stays valid because the valid centre range shrinks linearly with the side.
    centres = np.stack([rng.uniform([side / 2, side / 2], [width - side / 2, height - side / 2]) for side in sides])
    u = _ease(np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1))[:, None]
    side = sides[0] + (sides[1] - sides[0]) * u[:, 0]
    centre = centres[0] + (centres[1] - centres[0]) * u
    half = side[:, None] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    return np.clip(boxes, 0.0, [width, height, width, height])


def _open_stream(container, fps: Fraction, size: int):
    """An H.264 video stream on ``container``, or MPEG-4 part 2 where libx264 is missing or fails to open."""
    import av

    for codec, options in CODECS:
        try:
            stream = container.add_stream(codec, rate=fps)
        except (av.error.FFmpegError, ValueError, av.codec.codec.UnknownCodecError):
            continue
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = options
        try:
            stream.codec_context.open()
        except av.error.FFmpegError:
            continue
        return stream
    raise RuntimeError(f"PyAV can open none of the encoders {[name for name, _ in CODECS]} for writing (expected "
                       f"an FFmpeg build with one of them)")


def write_stream(images: list[Path], out: Path, fps: int = 10, size: int = 128, seed: int = 0, min_s: float = 2.0,
                 max_s: float = 8.0) -> list[Segment]:
    """Write ``images`` (in order) as one ``size`` x ``size`` mp4 at ``fps`` to ``out``, each shown for a random
    ``min_s``..``max_s`` s with camera motion; the segments also go to the JSON sidecar ``out.with_suffix('.json')``.
    Returns the segments (seconds; ``image_index`` into ``images``)."""
    import av

    images = [Path(p) for p in images]
    if not images:
        raise ValueError("write_stream got no images (expected at least one image path)")
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"write_stream: {len(missing)} image(s) do not exist, e.g. {missing[:3]}")
    if size < 16 or size % 2:
        raise ValueError(f"write_stream size={size} (expected an even number >= 16: yuv420p halves each side)")
    if not 0 < min_s <= max_s:
        raise ValueError(f"write_stream min_s={min_s}, max_s={max_s} (expected 0 < min_s <= max_s)")
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"write_stream fps={fps} (expected > 0)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = segment_durations(len(images), float(rate), rng, min_s, max_s)
    segments, first = [], 0
    with av.open(str(out), "w") as container:
        stream = _open_stream(container, rate, size)
        for index, (path, length) in enumerate(zip(images, lengths)):
            with Image.open(path) as handle:
                image = handle.convert("RGB")
            for offset, box in enumerate(crop_path(image.width, image.height, length, rng)):
                view = image.resize((size, size), Image.BILINEAR, box=tuple(float(v) for v in box))
                frame = av.VideoFrame.from_ndarray(np.asarray(view), format="rgb24")
                frame.pts, frame.time_base = first + offset, 1 / rate  # one tick per frame
                for packet in stream.encode(frame):
                    container.mux(packet)
            segments.append(Segment(first / float(rate), (first + length) / float(rate), index))
            first += length
        for packet in stream.encode():
            container.mux(packet)
    sidecar_path(out).write_text(json.dumps({
        "video": out.name, "fps": float(rate), "size": size, "seed": seed, "frames": first,
        "duration": first / float(rate), "codec": stream.codec_context.name,
        "images": [str(p) for p in images], "segments": [asdict(s) for s in segments]}, indent=1) + "\n")
    return segments


def read_segments(video: Path) -> list[Segment]:
    """The segments of a stream written by ``write_stream``, from its JSON sidecar."""
    sidecar = sidecar_path(video)
    if not sidecar.is_file():
        raise FileNotFoundError(f"stream sidecar '{sidecar}' does not exist (expected the JSON that write_stream "
                                f"writes beside '{video}')")
    return [Segment(**s) for s in json.loads(sidecar.read_text())["segments"]]


def read_sidecar(video: Path) -> dict:
    """The whole sidecar record: fps, size, seed, frames, duration, codec, images, segments."""
    return json.loads(sidecar_path(video).read_text())
