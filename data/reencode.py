"""``jepa data reencode``: an ImageNet-style folder re-encoded as square JPEGs of one size.

    jepa data reencode --src DIR --out DIR [--size 224] [--quality 90] [--workers N] [--splits train val]

Each image of ``<src>/<split>/<class>/`` (every extension ``data.folder`` reads) is decoded by
``data.folder.load_rgb_uint8``, its shorter side resized to ``size`` (bicubic, antialiased, as
``data.transforms.eval_transform`` resizes), centre-cropped to size x size and written as a baseline JPEG of
``quality`` (PIL, 4:2:0 chroma: what nvJPEG's hardware engine decodes) at the same relative path under ``out``; a
non-JPEG source keeps its stem with the extension ``.JPEG``.
- Resumable: a file already in ``out`` is not written again. Each file is written under a temporary name and renamed,
  so a killed run leaves no partial image behind.
- Parallel: ``workers`` processes (0 or 1: this one).
- A corrupt or unreadable source is skipped, logged, counted and named in the summary (never written); a later run
  tries it again.

Made for the 224 px data-pipeline benchmark (``benchmarks/data_pipeline.py``) from Imagenette
(``../shared/data/imagenette``), whose images are 128 px: at 224 they are upscaled, so a file holds less detail, and
costs less entropy decoding, than a 224 px crop of a real photo; the pixel count, which sets the cost of the IDCT,
the colour conversion and the crop, is that of a 224 px image.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .folder import CorruptImageError, load_rgb_uint8, scan_split

logger = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpeg", ".jpg")  # kept as they are (``.JPEG`` stays ``.JPEG``); other formats become ``.JPEG``


@dataclass
class ReencodeReport:
    """What a run did: files written, files already in ``out``, and the sources it could not read (messages)."""

    written: int = 0
    existing: int = 0
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, src: Path, out: Path) -> str:
        lines = [f"reencoded {src} -> {out}: {self.written} written, {self.existing} already there, "
                 f"{len(self.unreadable)} unreadable (skipped) in {self.seconds:.1f} s"]
        return "\n".join(lines + [f"  unreadable: {message}" for message in self.unreadable])


def output_path(src_file: Path, src: Path, out: Path) -> Path:
    """Where ``src_file`` goes: the same path under ``out``, with ``.JPEG`` for a non-JPEG source."""
    relative = src_file.relative_to(src)
    if src_file.suffix.lower() not in JPEG_SUFFIXES:
        relative = relative.with_suffix(".JPEG")
    return out / relative


def plan(src: Path, out: Path, splits: list[str]) -> tuple[list[tuple[Path, Path]], int]:
    """([(source, destination)] still to write, how many destinations exist already). Errors name a missing split
    (``scan_split``) or two sources that would be written to one file."""
    jobs, existing, owners = [], 0, {}
    for split in splits:
        samples, _ = scan_split(src, split)
        for source, _ in samples:
            dest = output_path(source, src, out)
            if dest in owners:
                raise ValueError(f"'{owners[dest]}' and '{source}' would both be written to '{dest}'; rename one")
            owners[dest] = source
            if dest.exists():
                existing += 1
            else:
                jobs.append((source, dest))
    return jobs, existing


def square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8: the shorter side to ``size`` (bicubic, antialiased), centre crop."""
    resized = F.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(resized, [size, size])


def reencode_file(job: tuple[Path, Path, int, int]) -> str | None:
    """Write one file; None, or the message of an unreadable source."""
    source, dest, size, quality = job
    try:
        image = square_resize(load_rgb_uint8(source), size)
    except CorruptImageError as err:
        return str(err)
    dest.parent.mkdir(parents=True, exist_ok=True)
    temporary = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")  # no image extension: no loader ever reads it
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(temporary, format="JPEG", quality=quality)
    os.replace(temporary, dest)
    return None


def _one_thread() -> None:
    torch.set_num_threads(1)  # the pool's processes are the parallelism


def reencode_folder(src: str | Path, out: str | Path, size: int = 224, quality: int = 90, workers: int = 0,
                    splits: tuple[str, ...] | list[str] = ("train", "val")) -> ReencodeReport:
    """Re-encode ``src``'s ``splits`` into ``out`` (see the module docstring); returns what was done."""
    src, out = Path(src), Path(out)
    if size < 1:
        raise ValueError(f"--size must be >= 1, got {size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out '{out}' is --src itself; write the re-encoded folder elsewhere")
    for split in splits:
        if not (src / split).is_dir():
            raise FileNotFoundError(f"--src '{src}' has no '{split}/' folder (expected <split>/<class>/<images> for "
                                    f"each of --splits {' '.join(splits)})")
    start = time.perf_counter()
    for stale in out.glob("*/*/.*.tmp"):  # left by a killed run
        stale.unlink()
    jobs, existing = plan(src, out, list(splits))
    report = ReencodeReport(existing=existing)
    tasks = [(source, dest, size, quality) for source, dest in jobs]
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread) as pool:
            results = list(pool.map(reencode_file, tasks, chunksize=max(1, min(64, len(tasks) // (4 * workers)))))
    else:
        results = [reencode_file(task) for task in tasks]
    for message in results:
        if message is None:
            report.written += 1
        else:
            logger.warning("skipping %s", message)
            report.unreadable.append(message)
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jepa data reencode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="an ImageNet-style folder (<split>/<class>/*.JPEG|png|...)")
    parser.add_argument("--out", required=True, help="folder to write <split>/<class>/*.JPEG into (resumable)")
    parser.add_argument("--size", type=int, default=224, help="side of the square output images in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (1-100)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = reencode_folder(args.src, args.out, args.size, args.quality, args.workers, args.splits)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(report.summary(Path(args.src), Path(args.out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
