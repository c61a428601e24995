"""data.easyvqa_classes: easy-VQA images as a shape- or colour-labelled image folder (an out-of-domain set for
frozen evaluations)."""
from __future__ import annotations

import pytest

from data.easyvqa_classes import image_labels, image_properties, main
from data.folder import scan_split


@pytest.mark.parametrize("question, answer, shape, color", [
    ("what shape is in the image?", "circle", {"circle"}, set()),
    ("what color is the triangle?", "blue", {"triangle"}, {"blue"}),  # the question names the shape
    ("what is the yellow shape?", "rectangle", {"rectangle"}, {"yellow"}),
    ("is there a red shape?", "yes", set(), {"red"}),
    ("is there a red shape?", "no", set(), set()),  # says only what is absent
    ("is there not a circle in the image?", "no", {"circle"}, set()),  # negated question, answer no: present
    ("is no teal shape present?", "no", set(), {"teal"}),
    ("does the image not contain a triangle?", "yes", set(), set()),
])
def test_what_a_question_says_the_image_holds(question, answer, shape, color):
    assert image_properties(question, answer) == {"shape": shape, "color": color}


def test_labels_per_image_and_disagreement_is_named():
    questions = ["what color is the circle?", "is there a triangle?", "what shape is present?", "is there a gray shape?"]
    assert image_labels(questions, ["red", "no", "circle", "yes"], [1, 1, 2, 2], "shape") == {1: "circle", 2: "circle"}
    assert image_labels(questions, ["red", "no", "circle", "yes"], [1, 1, 2, 2], "color") == {1: "red", 2: "gray"}
    with pytest.raises(ValueError, match=r"disagreeing shape answers: 1 \(e.g. image 1: \['circle', 'triangle'\]\)"):
        image_labels(questions[:2], ["red", "yes"], [1, 1], "shape")
    with pytest.raises(ValueError, match="label 'size' is unknown"):
        image_labels([], [], [], "size")


def test_the_command_writes_an_image_folder_every_loader_reads(tmp_path, capsys):
    main(["--out", str(tmp_path / "shapes"), "--label", "shape"])
    printed = capsys.readouterr().out
    assert "left out" in printed
    train, classes = scan_split(tmp_path / "shapes", "train")
    val, val_classes = scan_split(tmp_path / "shapes", "val")
    assert classes == val_classes == ["circle", "rectangle", "triangle"]
    assert 3500 < len(train) <= 4000 and 900 < len(val) <= 1000  # a few % have no shape named by their questions
    assert all(path.resolve().is_file() for path, _ in train[:20])
