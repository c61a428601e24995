"""Vision-language sources: (image, query text, target text) pairs for VL-JEPA training and evaluation.

    source = open_vl_source(cfg.data, "train")     # data.source: flickr | easyvqa | jsonl
    source.pairs[i] -> VLPair(image=index into source.images, query, target, key)   source.targets[key] == target

- ``flickr_source``: Flickr8k-style captions (``root/images/*.jpg``, ``root/captions.txt`` CSV ``image,caption``),
  split by image with a fixed, versioned split file (``data/splits/flickr8k_1k.json`` by default; write one for
  another folder with ``python -m data.vl_sources write-flickr-split ROOT OUT``).
- ``easyvqa_source``: the easy-VQA questions of the PyPI package ``easy_vqa`` (``val``: train images with id % 10 == 0,
  held out of ``train``).
- ``jsonl_source``: one ``{"image": path, "query": str (optional), "target": str}`` object a line.

Keys: ``key`` is the index of a pair's target text in ``source.targets`` (the distinct target strings of the source in
order of first appearance; for easy-VQA the answer vocabulary, so keys mean the same answer in every split). Pairs with
the same target text share a key: the InfoNCE loss counts them all as positives.

Bad entries (an empty caption / query / target, a malformed line) are a counted, logged skip (``source.skipped``) or
raise naming ``file:line``, by ``on_bad`` (``open_vl_source`` passes ``data.on_corrupt``). A missing folder or file is
always an error that names it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
FLICKR_SPLIT_FILE = SPLITS_DIR / "flickr8k_1k.json"
FLICKR_LAYOUT = "a Flickr8k-style folder with images/*.jpg and captions.txt (CSV with header 'image,caption')"
SOURCES = ("flickr", "easyvqa", "jsonl")

# /work/shared/data/README.md, "Imagenette class folders (WordNet id -> name)"
IMAGENETTE_CLASSNAMES: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

EASYVQA_SHAPES = ("circle", "rectangle", "triangle")
EASYVQA_YES_NO = ("yes", "no")
EASYVQA_VAL_MODULUS = 10  # train images whose id % 10 == 0 form "val" (a fixed 10%, held out of "train")


class VLSourceError(ValueError):
    """A bad entry of a VL source (raised with ``on_bad='raise'``) or a bad split / source name; names file:line."""


@dataclass(frozen=True)
class VLPair:
    image: int  # index into VLSource.images
    query: str  # "" when the item has no query
    target: str
    key: int  # index of ``target`` in VLSource.targets


@dataclass
class VLSource:
    name: str
    images: list[Path]
    pairs: list[VLPair]
    targets: list[str]  # targets[key] = the text
    candidates: list[str] | None = None  # VQA: the answer vocabulary; None otherwise
    question_types: list[str] | None = None  # per pair (VQA): "shape" / "color" / "yes/no"
    skipped: int = 0  # bad entries dropped while reading (counted, logged)

    def captions_by_image(self) -> list[list[str]]:
        """All target texts of each image (``[len(images)]`` lists, in pair order): retrieval's ground truth."""
        out: list[list[str]] = [[] for _ in self.images]
        for pair in self.pairs:
            out[pair.image].append(pair.target)
        return out

    def pairs_by_image(self) -> list[list[int]]:
        """Indices into ``pairs`` of each image's pairs."""
        out: list[list[int]] = [[] for _ in self.images]
        for i, pair in enumerate(self.pairs):
            out[pair.image].append(i)
        return out


def class_prompts(names, template: str = "a photo of a {}.") -> list[str]:
    """One text per class name, e.g. ``['a photo of a tench.', ...]`` (zero-shot classification targets)."""
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{}}' where the class name goes")
    return [template.format(name) for name in names]


class _Entries:
    """Collects pairs, assigns keys (distinct target texts) and handles bad entries by ``on_bad``."""

    def __init__(self, on_bad: str, targets: list[str] | None = None):
        if on_bad not in ("skip", "raise"):
            raise ValueError(f"on_bad '{on_bad}' is unknown (expected 'skip' or 'raise')")
        self.on_bad = on_bad
        self.targets: list[str] = list(targets or [])
        self.keys = {text: key for key, text in enumerate(self.targets)}
        self.fixed_targets = targets is not None
        self.pairs: list[VLPair] = []
        self.skipped = 0

    def bad(self, where: str, why: str) -> None:
        if self.on_bad == "raise":
            raise VLSourceError(f"{where}: {why}")
        self.skipped += 1
        logger.warning("skipping %s: %s", where, why)

    def add(self, image: int, query: str, target: str) -> None:
        if target not in self.keys:
            if self.fixed_targets:
                raise VLSourceError(f"target {target!r} is not one of {self.targets}")
            self.keys[target] = len(self.targets)
            self.targets.append(target)
        self.pairs.append(VLPair(image, query, target, self.keys[target]))


# ---------------------------------------------------------------------------------------------------- Flickr captions

def _name_list_hash(names) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def _flickr_image_names(root: Path) -> list[str]:
    if not str(root) or not root.is_dir():
        raise FileNotFoundError(f"data.root '{root}' does not exist (expected {FLICKR_LAYOUT})")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"data.root '{root}' has no 'images/' folder (expected {FLICKR_LAYOUT})")
    names = sorted(p.name for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not names:
        raise FileNotFoundError(f"'{images_dir}' holds no .jpg images (expected {FLICKR_LAYOUT})")
    return names


def make_flickr_split(root: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> dict:
    """The split record of ``root/images``: a ``random.Random(seed)`` shuffle of the sorted image names cut into
    ``sizes`` (default train/val/test 80/10/10 %), each split's names sorted, plus the SHA-256 of the sorted names."""
    names = _flickr_image_names(Path(root))
    if sizes is None:
        val = test = len(names) // 10
        sizes = {"train": len(names) - val - test, "val": val, "test": test}
    if sum(sizes.values()) != len(names):
        raise ValueError(f"split sizes {sizes} add up to {sum(sizes.values())}, not the {len(names)} images of "
                         f"'{root}'")
    order = list(names)
    random.Random(seed).shuffle(order)
    splits, start = {}, 0
    for split, size in sizes.items():
        splits[split] = sorted(order[start:start + size])
        start += size
    return {"description": "Flickr images split by image (a seeded shuffle of the sorted names); "
                           "written by: python -m data.vl_sources write-flickr-split ROOT OUT",
            "seed": seed, "num_images": len(names), "names_sha256": _name_list_hash(names), "splits": splits}


def write_flickr_split(root: str | Path, out: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``make_flickr_split(root, sizes, seed)`` to ``out`` (JSON) and return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(make_flickr_split(root, sizes, seed), indent=1) + "\n")
    return out


def read_flickr_split(root: str | Path, split: str, split_file: str | Path | None = None) -> list[str]:
    """The sorted image names of ``split``, after checking that ``root/images`` holds exactly the split file's
    images (a mismatch raises naming the file and how many names differ)."""
    split_file = Path(split_file) if split_file else FLICKR_SPLIT_FILE
    names = _flickr_image_names(Path(root))
    if not split_file.is_file():
        raise FileNotFoundError(f"data.split_file '{split_file}' does not exist (write one with "
                                f"python -m data.vl_sources write-flickr-split {root} {split_file})")
    record = json.loads(split_file.read_text())
    if _name_list_hash(names) != record["names_sha256"]:
        listed = {name for split_names in record["splits"].values() for name in split_names}
        missing, extra = sorted(listed - set(names)), sorted(set(names) - listed)
        raise ValueError(
            f"split file '{split_file}' does not match the images of '{Path(root) / 'images'}': "
            f"{len(missing) + len(extra)} names differ ({len(missing)} listed but not in the folder, e.g. "
            f"{missing[:3]}; {len(extra)} in the folder but not listed, e.g. {extra[:3]}); pass data.split_file for "
            f"this folder (python -m data.vl_sources write-flickr-split ROOT OUT)")
    if split not in record["splits"]:
        raise VLSourceError(f"split '{split}' is unknown for '{split_file}' (expected one of "
                            f"{sorted(record['splits'])})")
    return list(record["splits"][split])


def flickr_source(root, split: str, split_file: str | Path | None = None, query: str = "describe the image",
                  on_bad: str = "skip") -> VLSource:
    """The caption pairs of the images of ``split`` (every caption of an image is a pair, all with ``query``).
    Images left without a caption (all of theirs were bad, or none listed) are dropped and counted in ``skipped``."""
    root = Path(root)
    names = read_flickr_split(root, split, split_file)
    captions_file = root / "captions.txt"
    if not captions_file.is_file():
        raise FileNotFoundError(f"data.root '{root}' has no captions.txt (expected {FLICKR_LAYOUT})")
    folder_names = {p.name for p in (root / "images").iterdir()}
    wanted = set(names)
    captions: dict[str, list[str]] = {name: [] for name in names}
    entries = _Entries(on_bad)
    with open(captions_file, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [cell.strip() for cell in header] != ["image", "caption"]:
            raise VLSourceError(f"{captions_file}:1: header {header} is not ['image', 'caption']")
        for row in reader:
            where = f"{captions_file}:{reader.line_num}"
            if len(row) != 2:
                entries.bad(where, f"expected 2 fields 'image,caption', got {len(row)}")
                continue
            name, caption = row[0].strip(), row[1].strip()
            if name not in folder_names:
                raise FileNotFoundError(f"{where} names image '{name}', which is not in '{root / 'images'}'")
            if name not in wanted:
                continue
            if not caption:
                entries.bad(where, f"empty caption for image '{name}'")
                continue
            captions[name].append(caption)
    images = []
    for name in names:
        if not captions[name]:
            entries.bad(f"{captions_file}", f"image '{name}' has no caption; left out")
            continue
        for caption in captions[name]:
            entries.add(len(images), query, caption)
        images.append(root / "images" / name)
    return VLSource(f"flickr:{split}", images, entries.pairs, entries.targets, skipped=entries.skipped)


# ---------------------------------------------------------------------------------------------------- easy-VQA

def easyvqa_question_type(answer: str) -> str:
    """"shape" (circle / rectangle / triangle), "yes/no", or "color" (every other easy-VQA answer)."""
    if answer in EASYVQA_SHAPES:
        return "shape"
    if answer in EASYVQA_YES_NO:
        return "yes/no"
    return "color"


def easyvqa_source(split: str, on_bad: str = "skip") -> VLSource:
    """easy-VQA questions of ``split``: "train" (train images with id % 10 != 0), "val" (id % 10 == 0), "test".
    Images are sorted by id; ``targets`` and ``candidates`` are both the answer vocabulary ``easy_vqa.get_answers()``."""
    if split not in ("train", "val", "test"):
        raise VLSourceError(f"easy-VQA split '{split}' is unknown (expected one of ['test', 'train', 'val'])")
    try:
        import easy_vqa
    except ImportError as err:
        raise ImportError("data.source 'easyvqa' needs the PyPI package easy-vqa (pip install easy-vqa==1.0)") from err
    if split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    in_val = split == "val"

    def wanted(image_id: int) -> bool:
        return split == "test" or (image_id % EASYVQA_VAL_MODULUS == 0) == in_val

    ids = sorted(i for i in paths if wanted(i))
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    candidates = list(easy_vqa.get_answers())
    entries = _Entries(on_bad, targets=candidates)
    types = []
    where = f"easy_vqa {'test' if split == 'test' else 'train'} questions.json"
    for number, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        if not wanted(image_id):
            continue
        if image_id not in row_of:
            raise FileNotFoundError(f"{where} question {number} names image {image_id}, which the package lacks")
        question, answer = question.strip(), answer.strip()
        if not question or answer not in entries.keys:
            entries.bad(f"{where} question {number}", f"empty question or answer {answer!r} not in {candidates}")
            continue
        entries.add(row_of[image_id], question, answer)
        types.append(easyvqa_question_type(answer))
    images = [Path(paths[i]) for i in ids]
    return VLSource(f"easyvqa:{split}", images, entries.pairs, entries.targets, candidates=candidates,
                    question_types=types, skipped=entries.skipped)


# ---------------------------------------------------------------------------------------------------- JSONL

def jsonl_source(path, on_bad: str = "skip") -> VLSource:
    """Pairs of a JSONL file: each non-blank line ``{"image": path, "target": str, "query": str}``.

    ``image`` is absolute or relative to the file's folder and must exist; ``target`` a non-empty string; ``query``
    may be omitted (no query: ``""``) but when given must be a non-empty string. A line with a ``"video"`` key raises
    (video items need the video pipeline). Images are the distinct paths in order of first appearance.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file '{path}' does not exist")
    entries = _Entries(on_bad)
    image_rows: dict[Path, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                entries.bad(where, f"not valid JSON ({err.msg})")
                continue
            if not isinstance(record, dict):
                entries.bad(where, f"expected a JSON object, got {type(record).__name__}")
                continue
            if "video" in record:
                raise VLSourceError(f"{where} is a video item (key 'video'): video JSONL items need the video "
                                    f"pipeline; jsonl_source reads image items only")
            image, target, query = record.get("image"), record.get("target"), record.get("query", "")
            if not isinstance(image, str) or not image or not isinstance(target, str) or not isinstance(query, str):
                entries.bad(where, "expected string fields 'image' and 'target' (and optionally 'query')")
                continue
            if not target.strip() or ("query" in record and not query.strip()):
                entries.bad(where, f"empty {'target' if not target.strip() else 'query'} text (omit 'query' for an "
                                   f"item without one)")
                continue
            image_path = Path(image) if Path(image).is_absolute() else path.parent / image
            if image_path not in image_rows:
                if not image_path.is_file():
                    raise FileNotFoundError(f"{where} names image '{image_path}', which does not exist")
                image_rows[image_path] = len(image_rows)
            entries.add(image_rows[image_path], query.strip(), target.strip())
    if not entries.pairs:
        raise VLSourceError(f"JSONL file '{path}' holds no valid pairs ({entries.skipped} bad lines skipped)")
    return VLSource(f"jsonl:{path.stem}", list(image_rows), entries.pairs, entries.targets, skipped=entries.skipped)


# ---------------------------------------------------------------------------------------------------- dispatch

def open_vl_source(data_cfg, split: str) -> VLSource:
    """The ``split`` of the source that ``data_cfg.source`` names: 'flickr' (``data.root``, ``data.split_file``,
    ``data.caption_query``), 'easyvqa' (the package), 'jsonl' (``data.root/<split>.jsonl``). Bad entries follow
    ``data.on_corrupt``."""
    source = data_cfg.source
    on_bad = data_cfg.on_corrupt
    if source == "flickr":
        return flickr_source(data_cfg.root, split, data_cfg.split_file or None, data_cfg.caption_query, on_bad)
    if source == "easyvqa":
        return easyvqa_source(split, on_bad)
    if source == "jsonl":
        root = Path(data_cfg.root)
        if not str(data_cfg.root) or not root.is_dir():
            raise FileNotFoundError(f"data.root '{root}' does not exist (expected a folder of <split>.jsonl files)")
        path = root / f"{split}.jsonl"
        if not path.is_file():
            present = sorted(p.stem for p in root.glob("*.jsonl"))
            raise VLSourceError(f"split '{split}' is unknown for data.root '{root}': no {split}.jsonl (splits there: "
                                f"{present})")
        return jsonl_source(path, on_bad)
    raise VLSourceError(f"data.source '{source}' is unknown (expected one of {list(SOURCES)})")


def _main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m data.vl_sources")
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("write-flickr-split", help="write the by-image train/val/test split of a Flickr folder")
    split.add_argument("root")
    split.add_argument("out")
    split.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_flickr_split(args.root, args.out, seed=args.seed))


if __name__ == "__main__":
    _main()
