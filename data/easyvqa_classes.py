"""easy-VQA images as an ImageNet-style classification folder, labelled by their shape or their colour: a small,
offline, out-of-domain dataset (64 px synthetic shapes) to evaluate any frozen encoder on with ``jepa eval``.

    jepa data easyvqa-classes --out DIR [--label shape|color]

Every easy-VQA image holds one shape of one colour; its label is read from its own questions and answers
(``image_properties``: what a "what ...?" answer or question names, what a yes/no answer asserts). ``train/`` holds the
package's 4,000 train images, ``val/`` its 1,000 test images, as ``<split>/<label>/<id>.png`` symbolic links to the
package's files (nothing is copied). An image whose questions only say what it does not hold (about 5% for shapes,
7% for colours) has no label and is left out, counted in the printed summary; questions that disagree on an
image's label are an error naming it.
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

from .vl_sources import EASYVQA_SHAPES, EASYVQA_YES_NO

EASYVQA_COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")

LABELS = ("shape", "color")


def image_properties(question: str, answer: str) -> dict[str, set[str]]:
    """The shape / colour words one question-answer pair says the image has: the answer of a "what ...?" question,
    the shape or colour a question names ("what color is the triangle?"), and the one a yes/no question asserts
    ("is there a red shape?" yes, "is there not a circle?" no)."""
    words = question.strip().rstrip("?").split()
    named = [w for w in words if w in EASYVQA_SHAPES or w in EASYVQA_COLORS]
    answer = answer.strip()
    if answer in EASYVQA_YES_NO:
        negated = "not" in words or words[:2] == ["is", "no"]
        present = (answer == "yes") != negated
        named = named if present else []
    else:
        named = named + [answer]
    found: dict[str, set[str]] = {"shape": set(), "color": set()}
    for word in named:
        found["shape" if word in EASYVQA_SHAPES else "color"].add(word)
    return found


def image_labels(questions: list[str], answers: list[str], image_ids: list[int], label: str) -> dict[int, str]:
    """{image id: its ``label`` (shape | color)} from one split's question lists; disagreeing answers are an
    error."""
    if label not in LABELS:
        raise ValueError(f"label '{label}' is unknown (expected one of {list(LABELS)})")
    found: dict[int, set[str]] = defaultdict(set)
    for question, answer, image_id in zip(questions, answers, image_ids):
        found[image_id] |= image_properties(question, answer)[label]
    bad = {image_id: sorted(values) for image_id, values in found.items() if len(values) > 1}
    if bad:
        first = next(iter(bad.items()))
        raise ValueError(f"easy-VQA images with disagreeing {label} answers: {len(bad)} (e.g. image {first[0]}: "
                         f"{first[1]})")
    return {image_id: values.pop() for image_id, values in found.items() if values}


def write_split(out: Path, split: str, paths: dict[int, str], labels: dict[int, str]) -> dict[str, int]:
    """Symlink every labelled image of ``paths`` into ``out/split/<label>/``; -> images per label (the images
    without a label, whose questions only say what they do not hold, are left out)."""
    counts: dict[str, int] = defaultdict(int)
    for image_id, path in sorted(paths.items()):
        if image_id not in labels:
            continue
        link = out / split / labels[image_id] / f"{image_id}{Path(path).suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(Path(path).resolve(), link)
        counts[labels[image_id]] += 1
    return dict(sorted(counts.items()))


def make_easyvqa_classes(out: str | Path, label: str = "shape") -> dict[str, tuple[dict[str, int], int]]:
    """Write ``out/train`` (easy-VQA train images) and ``out/val`` (its test images) by ``label``; -> per split
    (images per label, images left out)."""
    try:
        import easy_vqa
    except ImportError as err:
        raise ImportError("jepa data easyvqa-classes needs the PyPI package easy-vqa (pip install easy-vqa==1.0)") \
            from err
    out = Path(out)
    splits = {"train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
              "val": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())}
    counts = {}
    for split, (questions, paths) in splits.items():
        by_label = write_split(out, split, paths, image_labels(*questions, label))
        counts[split] = (by_label, len(paths) - sum(by_label.values()))
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jepa data easyvqa-classes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder to write train/ and val/ into")
    parser.add_argument("--label", default="shape", choices=LABELS)
    args = parser.parse_args(argv)
    counts = make_easyvqa_classes(args.out, args.label)
    for split, (by_label, left_out) in counts.items():
        print(f"{split}: {sum(by_label.values())} images by {args.label}: {by_label} -> {args.out / split} "
              f"({left_out} left out: no {args.label} named by their questions)")


if __name__ == "__main__":
    main()
