"""Labelled subsets given by a split file (the SimCLR format of ImageNet 1% / 10%).

One image per line; blank lines and lines starting with ``#`` are skipped. A line is either
- a file name whose class is its WordNet id prefix, as in SimCLR's ``imagenet_subsets/1percent.txt``:
  ``n01440764_10026.JPEG`` -> ``<root>/train/n01440764/n01440764_10026.JPEG``; or
- a path relative to the split folder, ``<wnid>/<file>``, for datasets whose file names carry no WordNet id
  (Imagenette's train images are named ``ILSVRC2012_val_*.JPEG``):
  ``n01440764/ILSVRC2012_val_00000293.JPEG``.

ImageNet 1%: ``jepa eval lowshot --encoder X --data /imagenet lowshot.split_file=1percent.txt`` with SimCLR's
file (github.com/google-research/simclr, ``imagenet_subsets/``); 10% likewise with ``10percent.txt``.
"""
from __future__ import annotations

import re
from pathlib import Path

from data.folder import scan_split

WNID = re.compile(r"^(n\d{8})_")


class SplitFileError(ValueError):
    """A split file names an unknown class, a missing image, or a line the format does not allow."""


def parse_split_file(path: str | Path, root: str | Path, split: str = "train") -> list[int]:
    """Indices, into the sample order of ``data.folder.scan_split(root, split)``, of the images the file lists
    (in file order, duplicates rejected)."""
    path = Path(path)
    if not path.is_file():
        raise SplitFileError(f"split file '{path}' does not exist")
    samples, classes = scan_split(root, split)
    split_dir = Path(root) / split
    index_of = {(p.parent.name, p.name): i for i, (p, _) in enumerate(samples)}
    known = set(classes)
    picked, seen = [], set()
    for line_no, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"split file '{path}' line {line_no} ('{line}')"
        parts = line.split("/")
        if len(parts) == 2:
            wnid, name = parts
        elif len(parts) == 1:
            match = WNID.match(line)
            if not match:
                raise SplitFileError(f"{where}: cannot take a class from the name (expected <wnid>_<id>.JPEG, "
                                     f"e.g. n01440764_10026.JPEG, or <class folder>/<file>)")
            wnid, name = match.group(1), line
        else:
            raise SplitFileError(f"{where}: expected a file name or <class folder>/<file>")
        if wnid not in known:
            raise SplitFileError(f"{where}: class '{wnid}' is not a class folder of '{split_dir}' "
                                 f"({len(classes)} classes, e.g. {', '.join(classes[:3])})")
        index = index_of.get((wnid, name))
        if index is None:
            raise SplitFileError(f"{where}: image '{split_dir / wnid / name}' does not exist")
        if index in seen:
            raise SplitFileError(f"{where}: image listed twice")
        seen.add(index)
        picked.append(index)
    if not picked:
        raise SplitFileError(f"split file '{path}' lists no images")
    return picked


def write_split_file(path: str | Path, root: str | Path, per_class: int, split: str = "train",
                     simclr_names: bool = False) -> Path:
    """Write a split file with the first ``per_class`` images of every class (``<wnid>/<file>`` lines, or bare
    SimCLR-style names when ``simclr_names``)."""
    samples, _ = scan_split(root, split)
    counts: dict[str, int] = {}
    lines = []
    for sample_path, _ in samples:
        wnid = sample_path.parent.name
        if counts.get(wnid, 0) < per_class:
            counts[wnid] = counts.get(wnid, 0) + 1
            lines.append(sample_path.name if simclr_names else f"{wnid}/{sample_path.name}")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
