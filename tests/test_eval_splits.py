"""Split files (SimCLR ImageNet 1% / 10% format) for Imagenette: both line forms, clear errors."""
import os

import pytest

from data.folder import scan_split
from eval.splits import SplitFileError, parse_split_file, write_split_file

from conftest import IMAGENETTE


@pytest.fixture(scope="module")
def simclr_named(tmp_path_factory):
    """train/<wnid>/<wnid>_<i>.JPEG symlinks to real Imagenette images (ImageNet's train naming)."""
    root = tmp_path_factory.mktemp("simclr_named")
    for cls in sorted(os.listdir(IMAGENETTE / "train"))[:3]:
        (root / "train" / cls).mkdir(parents=True)
        for i, name in enumerate(sorted(os.listdir(IMAGENETTE / "train" / cls))[:4]):
            (root / "train" / cls / f"{cls}_{i}.JPEG").symlink_to(IMAGENETTE / "train" / cls / name)
    return root


def test_folder_lines_for_imagenette(imagenette_small, tmp_path):
    split = write_split_file(tmp_path / "imagenette_2pc.txt", imagenette_small, per_class=2)
    lines = split.read_text().split()
    assert len(lines) == 20 and lines[0].startswith("n01440764/ILSVRC2012_val_")
    idx = parse_split_file(split, imagenette_small)
    samples, _ = scan_split(imagenette_small, "train")
    assert [f"{samples[i][0].parent.name}/{samples[i][0].name}" for i in idx] == lines
    assert sorted({samples[i][1] for i in idx}) == list(range(10))


def test_simclr_names(simclr_named, tmp_path):
    split = tmp_path / "1percent.txt"
    split.write_text("# comment\nn01440764_0.JPEG\n\nn02102040_3.JPEG\n")
    idx = parse_split_file(split, simclr_named)
    samples, classes = scan_split(simclr_named, "train")
    assert [samples[i][0].name for i in idx] == ["n01440764_0.JPEG", "n02102040_3.JPEG"]
    assert [classes[samples[i][1]] for i in idx] == ["n01440764", "n02102040"]


def test_unknown_class(simclr_named, tmp_path):
    split = tmp_path / "bad.txt"
    split.write_text("n01440764_0.JPEG\nn09999999_1.JPEG\n")
    with pytest.raises(SplitFileError, match=r"line 2 .*class 'n09999999' is not a class folder"):
        parse_split_file(split, simclr_named)


def test_missing_image(simclr_named, tmp_path):
    split = tmp_path / "bad.txt"
    split.write_text("n01440764_77.JPEG\n")
    with pytest.raises(SplitFileError, match=r"line 1 .*image '.*n01440764/n01440764_77.JPEG' does not exist"):
        parse_split_file(split, simclr_named)


def test_unparseable_and_missing_file(simclr_named, tmp_path):
    split = tmp_path / "bad.txt"
    split.write_text("ILSVRC2012_val_00000293.JPEG\n")
    with pytest.raises(SplitFileError, match="cannot take a class from the name"):
        parse_split_file(split, simclr_named)
    with pytest.raises(SplitFileError, match="does not exist"):
        parse_split_file(tmp_path / "nope.txt", simclr_named)
