"""Shared fixtures: tiny configs and a small real Imagenette folder (symlinks into ../shared/data)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from jepa.config import load_config

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"

TINY = [
    "model.encoder=vit_tiny", "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.patch_size=8",
    "data.img_size=32", "predictor.depth=1", "predictor.dim=32", "predictor.num_heads=2",
    "masks.min_keep=2", "data.batch_size=8", "data.num_workers=0", "optim.warmup_steps=2", "trainer.log_every=1",
    "trainer.progress_bar=false", "monitor.bank_per_class=4", "monitor.query_per_class=2", "monitor.batch_size=32",
    "trainer.plot=false",  # the health PNG costs ~1 s a run; tests/test_lejepa.py checks it
]


def tiny_config(*overrides: str, root: str | Path = "", output_dir: str | Path = "outputs/test"):
    return load_config(None, TINY + [f"data.root={root}", f"trainer.output_dir={output_dir}", *overrides])


def make_subset(dest: Path, train_per_class: int, val_per_class: int, classes: int = 10) -> Path:
    """An ImageNet-style folder of symlinks to the first images of each Imagenette class."""
    if not IMAGENETTE.is_dir():
        raise FileNotFoundError(f"real test data missing: expected Imagenette at {IMAGENETTE} (see ../shared/data)")
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for cls in sorted(os.listdir(IMAGENETTE / split))[:classes]:
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(IMAGENETTE / split / cls))[:count]:
                (dest / split / cls / name).symlink_to(IMAGENETTE / split / cls / name)
    return dest


FLICKR = REPO.parent / "shared" / "data" / "flickr8k-1k"


def make_flickr_subset(dest: Path, count: int = 24, sizes: dict | None = None) -> tuple[Path, Path]:
    """(folder, split file): the first ``count`` real Flickr8k-1k images (symlinks) with their captions, split
    16/4/4 (or ``sizes``) by a split file of their own."""
    from data.vl_sources import write_flickr_split

    if not FLICKR.is_dir():
        raise FileNotFoundError(f"real test data missing: expected Flickr8k-1k at {FLICKR} (see ../shared/data)")
    (dest / "images").mkdir(parents=True)
    names = sorted(p.name for p in (FLICKR / "images").iterdir())[:count]
    for name in names:
        (dest / "images" / name).symlink_to(FLICKR / "images" / name)
    lines = (FLICKR / "captions.txt").read_text().splitlines()
    keep = [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0] in set(names)]
    (dest / "captions.txt").write_text("\n".join(keep) + "\n")
    sizes = sizes or {"train": count - 2 * (count // 6), "val": count // 6, "test": count // 6}
    return dest, write_flickr_split(dest, dest / "split.json", sizes)


@pytest.fixture(scope="session")
def imagenette_small(tmp_path_factory) -> Path:
    """10 classes x 8 train / 4 val real images."""
    return make_subset(tmp_path_factory.mktemp("imagenette_small"), 8, 4)
