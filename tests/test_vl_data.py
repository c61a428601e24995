"""VL sources (Flickr split file, easy-VQA, JSONL), their bad-input table, the pair dataset and its collator."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from data.folder import CorruptImageError
from data.transforms import pretrain_transform
from data.vl import VLCollator, VLPairDataset
from data.vl_sources import (FLICKR_SPLIT_FILE, IMAGENETTE_CLASSNAMES, VLSourceError, class_prompts,
                             easyvqa_source, flickr_source, jsonl_source, make_flickr_split, open_vl_source,
                             write_flickr_split)

from conftest import REPO

FLICKR = REPO.parent / "shared" / "data" / "flickr8k-1k"
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"


class FakeTokenizer:
    """Picklable stand-in for a HF tokenizer: [1] + (ord(c) % 97 + 2 per character) + [0 padding] to max_length."""

    def __call__(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            codes = [1] + [ord(c) % 97 + 2 for c in text][:max_length - 1]
            ids[row, :len(codes)] = torch.tensor(codes)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def caption_rows() -> list[list[str]]:
    with open(FLICKR / "captions.txt", newline="") as handle:
        return list(csv.reader(handle))[1:]


def make_flickr_copy(dest: Path, count: int, sizes: dict[str, int] | None = None, corrupt: bool = False,
                     extra_rows: list[list[str]] = ()) -> tuple[Path, Path]:
    """A Flickr folder of symlinks to the first ``count`` real images (plus ``broken.jpg`` when ``corrupt``), their
    captions (+ ``extra_rows``), and a split file for it: (root, split file)."""
    if not FLICKR.is_dir():
        raise FileNotFoundError(f"real test data missing: expected Flickr8k-1k at {FLICKR} (see ../shared/data)")
    (dest / "images").mkdir(parents=True)
    names = sorted(os.listdir(FLICKR / "images"))[:count]
    for name in names:
        (dest / "images" / name).symlink_to(FLICKR / "images" / name)
    rows = [row for row in caption_rows() if row[0] in set(names)]
    if corrupt:
        (dest / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        rows.append(["broken.jpg", "a broken picture ."])
    with open(dest / "captions.txt", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "caption"], *rows, *extra_rows])
    total = count + corrupt
    sizes = sizes or {"train": total - 2, "val": 1, "test": 1}
    return dest, write_flickr_split(dest, dest / "split.json", sizes)


# ---------------------------------------------------------------------------------------------------- split file

def test_flickr_split_file_covers_every_image_once_and_regenerates():
    record = json.loads(FLICKR_SPLIT_FILE.read_text())
    splits = record["splits"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 800, "val": 100, "test": 100}
    listed = [name for names in splits.values() for name in names]
    assert len(listed) == len(set(listed)) == 1000  # disjoint
    assert sorted(listed) == sorted(os.listdir(FLICKR / "images"))  # covers every image
    assert make_flickr_split(FLICKR, seed=record["seed"]) == record  # the documented generator reproduces it
    for split, names in splits.items():
        assert [p.name for p in flickr_source(FLICKR, split).images] == names


def test_split_hash_check_fires_on_a_renamed_file(tmp_path):
    root, split_file = make_flickr_copy(tmp_path / "few", 5)
    assert len(flickr_source(root, "train", split_file).images) == 3
    first = sorted((root / "images").iterdir())[0]
    first.rename(first.with_name("renamed.jpg"))
    with pytest.raises(ValueError, match=r"split file '.*split.json' does not match.*: 2 names differ \(1 listed but "
                                         r"not in the folder.*1 in the folder but not listed.*renamed.jpg"):
        flickr_source(root, "train", split_file)
    # the versioned default file checks a full 1,000-image folder the same way
    (tmp_path / "full" / "images").mkdir(parents=True)
    for name in os.listdir(FLICKR / "images"):
        (tmp_path / "full" / "images" / name).symlink_to(FLICKR / "images" / name)
    (tmp_path / "full" / "images" / "1000268201_693b08cb0e.jpg").rename(tmp_path / "full" / "images" / "x.jpg")
    with pytest.raises(ValueError, match=r"flickr8k_1k.json' does not match.*: 2 names differ"):
        flickr_source(tmp_path / "full", "test")


# ---------------------------------------------------------------------------------------------------- pairs and keys

def test_flickr_pairs_keys_and_captions_by_image():
    source = flickr_source(FLICKR, "val", query="what is here?")
    expected: dict[str, list[str]] = {}
    for name, caption in caption_rows():
        expected.setdefault(name, []).append(caption.strip())
    assert source.captions_by_image() == [expected[p.name] for p in source.images]
    assert len(source.pairs) == 5 * len(source.images) == 500 and source.skipped == 0
    assert all(pair.query == "what is here?" for pair in source.pairs)
    assert all(source.targets[pair.key] == pair.target for pair in source.pairs)
    assert len(source.targets) == len({pair.target for pair in source.pairs})  # one key per distinct text
    assert source.candidates is None and source.question_types is None


def test_same_target_text_gets_the_same_key(tmp_path):
    names = sorted(os.listdir(FLICKR / "images"))[:3]
    root, split_file = make_flickr_copy(tmp_path / "f", 3, sizes={"train": 3, "val": 0, "test": 0},
                                        extra_rows=[[names[0], "A dog ."], [names[2], "A dog ."]])
    source = flickr_source(root, "train", split_file)
    dogs = [pair for pair in source.pairs if pair.target == "A dog ."]
    assert len(dogs) == 2 and dogs[0].key == dogs[1].key and dogs[0].image != dogs[1].image
    others = {pair.key for pair in source.pairs if pair.target != "A dog ."}
    assert dogs[0].key not in others


def test_easyvqa_question_types_candidates_and_val_split():
    import easy_vqa

    candidates = easy_vqa.get_answers()
    train, val, test = easyvqa_source("train"), easyvqa_source("val"), easyvqa_source("test")
    shapes, yes_no = {"circle", "rectangle", "triangle"}, {"yes", "no"}
    colors = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
    assert set(candidates) == shapes | yes_no | colors
    for source in (train, val, test):
        assert source.candidates == source.targets == candidates
        assert len(source.question_types) == len(source.pairs)
        for pair, kind in zip(source.pairs, source.question_types):
            assert source.targets[pair.key] == pair.target
            assert kind == ("shape" if pair.target in shapes else "yes/no" if pair.target in yes_no else "color")
        assert set(source.question_types) == {"shape", "color", "yes/no"}
    # val: the train images with id % 10 == 0, held out of train; together they are the package's train split
    train_paths = easy_vqa.get_train_image_paths()
    val_ids = {int(p.stem) for p in val.images}
    assert val_ids == {i for i in train_paths if i % 10 == 0} and len(val.images) == len(train_paths) // 10
    assert not val_ids & {int(p.stem) for p in train.images}
    assert len(train.pairs) + len(val.pairs) == len(easy_vqa.get_train_questions()[0])
    assert len(test.images) == len(easy_vqa.get_test_image_paths())
    questions, answers, image_ids = easy_vqa.get_test_questions()
    first = test.pairs[0]  # pairs keep the package's question order
    assert (first.query, first.target, test.images[first.image].stem) == (questions[0], answers[0], str(image_ids[0]))


def test_class_prompts_and_imagenette_names():
    assert class_prompts(["tench", "church"]) == ["a photo of a tench.", "a photo of a church."]
    assert class_prompts(["x"], "{} photo") == ["x photo"]
    with pytest.raises(ValueError, match="has no '{}'"):
        class_prompts(["x"], "a photo")
    assert len(IMAGENETTE_CLASSNAMES) == 10 and IMAGENETTE_CLASSNAMES["n03888257"] == "parachute"
    if IMAGENETTE.is_dir():
        assert sorted(IMAGENETTE_CLASSNAMES) == sorted(os.listdir(IMAGENETTE / "train"))


# ---------------------------------------------------------------------------------------------------- bad inputs

def test_flickr_missing_root_images_captions(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.root '.*nowhere' does not exist \(expected a Flickr8k"):
        flickr_source(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no 'images/' folder"):
        flickr_source(tmp_path / "empty", "train")
    root, split_file = make_flickr_copy(tmp_path / "f", 4)
    with pytest.raises(FileNotFoundError, match=r"data.split_file '.*absent.json' does not exist"):
        flickr_source(root, "train", tmp_path / "absent.json")
    (root / "captions.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"data.root '.*f' has no captions.txt"):
        flickr_source(root, "train", split_file)


def test_flickr_caption_naming_a_missing_image(tmp_path):
    root, split_file = make_flickr_copy(tmp_path / "f", 3, extra_rows=[["ghost.jpg", "nobody here ."]])
    with pytest.raises(FileNotFoundError, match=r"captions.txt:17 names image 'ghost.jpg', which is not in"):
        flickr_source(root, "train", split_file)


def test_flickr_empty_caption_is_counted_or_raises(tmp_path, caplog):
    name = sorted(os.listdir(FLICKR / "images"))[0]
    root, split_file = make_flickr_copy(tmp_path / "f", 3, sizes={"train": 3, "val": 0, "test": 0},
                                        extra_rows=[[name, "  "], [name]])
    source = flickr_source(root, "train", split_file)
    assert source.skipped == 2 and len(source.pairs) == 15
    assert "captions.txt:17: empty caption" in caplog.text and "captions.txt:18: expected 2 fields" in caplog.text
    with pytest.raises(VLSourceError, match=r"captions.txt:17: empty caption for image '" + name):
        flickr_source(root, "train", split_file, on_bad="raise")


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def jsonl_dir(tmp_path):
    images = sorted(os.listdir(FLICKR / "images"))[:2]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").symlink_to(FLICKR / "images" / images[0])
    return tmp_path, FLICKR / "images" / images[1]


def test_jsonl_pairs_relative_absolute_and_no_query(jsonl_dir):
    root, absolute = jsonl_dir
    path = write_jsonl(root / "train.jsonl", [
        {"image": "imgs/a.jpg", "query": "what?", "target": "a dog"},
        "",
        {"image": str(absolute), "target": "a cat"},
        {"image": "imgs/a.jpg", "query": "who?", "target": "a dog"},
    ])
    source = jsonl_source(path)
    assert source.images == [root / "imgs" / "a.jpg", absolute]
    assert [(p.image, p.query, p.target, p.key) for p in source.pairs] == [
        (0, "what?", "a dog", 0), (1, "", "a cat", 1), (0, "who?", "a dog", 0)]
    assert source.targets == ["a dog", "a cat"] and source.skipped == 0


@pytest.mark.parametrize("line, why", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"image": "imgs/a.jpg"}), "expected string fields 'image' and 'target'"),
    (json.dumps({"image": "imgs/a.jpg", "target": 3}), "expected string fields"),
    (json.dumps({"image": "imgs/a.jpg", "target": " "}), "empty target text"),
    (json.dumps({"image": "imgs/a.jpg", "query": "", "target": "x"}), "empty query text"),
])
def test_jsonl_bad_lines_are_counted_or_raise(jsonl_dir, line, why, caplog):
    root, _ = jsonl_dir
    good = {"image": "imgs/a.jpg", "query": "q", "target": "t"}
    path = write_jsonl(root / "train.jsonl", [good, line, good])
    source = jsonl_source(path)
    assert source.skipped == 1 and len(source.pairs) == 2
    assert f"train.jsonl:2: {why}" in caplog.text
    with pytest.raises(VLSourceError, match=rf"train.jsonl:2: {why}"):
        jsonl_source(path, on_bad="raise")


def test_jsonl_errors_that_always_raise(jsonl_dir):
    root, _ = jsonl_dir
    with pytest.raises(FileNotFoundError, match=r"JSONL file '.*absent.jsonl' does not exist"):
        jsonl_source(root / "absent.jsonl")
    path = write_jsonl(root / "v.jsonl", [{"image": "imgs/a.jpg", "target": "t"}, {"video": "c.mp4", "target": "t"}])
    with pytest.raises(VLSourceError, match=r"v.jsonl:2 is a video item.*need the video pipeline"):
        jsonl_source(path)
    path = write_jsonl(root / "m.jsonl", [{"image": "imgs/gone.jpg", "target": "t"}])
    with pytest.raises(FileNotFoundError, match=r"m.jsonl:1 names image '.*gone.jpg', which does not exist"):
        jsonl_source(path)
    path = write_jsonl(root / "e.jsonl", ["{bad", {"image": "imgs/a.jpg", "target": ""}])
    with pytest.raises(VLSourceError, match=r"holds no valid pairs \(2 bad lines skipped\)"):
        jsonl_source(path)


def data_cfg(**fields):
    from types import SimpleNamespace

    defaults = dict(source="flickr", root=str(FLICKR), split_file="", caption_query="describe the image",
                    on_corrupt="skip")
    return SimpleNamespace(**{**defaults, **fields})


def test_open_vl_source_dispatch_unknown_source_and_split(jsonl_dir):
    root, _ = jsonl_dir
    write_jsonl(root / "train.jsonl", [{"image": "imgs/a.jpg", "target": "t"}])
    assert open_vl_source(data_cfg(source="jsonl", root=str(root)), "train").name == "jsonl:train"
    assert open_vl_source(data_cfg(), "test").name == "flickr:test"
    assert open_vl_source(data_cfg(source="easyvqa"), "val").name == "easyvqa:val"
    with pytest.raises(VLSourceError, match=r"data.source 'coco' is unknown \(expected one of \['flickr', 'easyvqa'"):
        open_vl_source(data_cfg(source="coco"), "train")
    with pytest.raises(VLSourceError, match=r"split 'dev' is unknown for '.*flickr8k_1k.json' \(expected one of "
                                            r"\['test', 'train', 'val'\]\)"):
        open_vl_source(data_cfg(), "dev")
    with pytest.raises(VLSourceError, match=r"easy-VQA split 'dev' is unknown"):
        open_vl_source(data_cfg(source="easyvqa"), "dev")
    with pytest.raises(VLSourceError, match=r"split 'dev' is unknown for data.root .*no dev.jsonl \(splits there: "
                                            r"\['train'\]\)"):
        open_vl_source(data_cfg(source="jsonl", root=str(root)), "dev")
    with pytest.raises(FileNotFoundError, match=r"data.root '.*nowhere' does not exist \(expected a folder of"):
        open_vl_source(data_cfg(source="jsonl", root=str(root / "nowhere")), "train")


# ---------------------------------------------------------------------------------------------------- dataset + collator

def test_dataset_replays_caption_and_crop_exactly(tmp_path):
    root, split_file = make_flickr_copy(tmp_path / "f", 4, sizes={"train": 4, "val": 0, "test": 0})
    source = flickr_source(root, "train", split_file)

    def dataset():
        return VLPairDataset(source, pretrain_transform(32, (0.3, 1.0), hflip=True), per_image=True, seed=3)

    first, resumed = dataset(), dataset()
    rng_before = torch.random.get_rng_state()
    a, b = first[(2, 5, 7)], resumed[(2, 5, 7)]
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the process RNG is left alone
    assert a["target"] == b["target"] and a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    assert a["image"].dtype == torch.uint8 and a["image"].shape == (3, 32, 32)
    assert a["target"] in source.captions_by_image()[2] and source.targets[a["key"]] == a["target"]
    # the caption and the crop change with the epoch (drawn per (seed, epoch, index)), not per call
    epochs = [first[(2, epoch, 0)] for epoch in range(12)]
    assert len({item["target"] for item in epochs}) > 1
    assert not all(torch.equal(item["image"], epochs[0]["image"]) for item in epochs[1:])
    assert len(first) == 4 and first[1]["target"] == first[(1, 0, 0)]["target"]  # an int key is epoch 0
    per_pair = VLPairDataset(source, pretrain_transform(32), per_image=False, seed=3)
    assert len(per_pair) == len(source.pairs) == 20
    assert [per_pair[i]["target"] for i in range(5)] == source.captions_by_image()[0]


def test_collator_shapes_dtypes_and_corrupt_skip(tmp_path, caplog):
    root, split_file = make_flickr_copy(tmp_path / "f", 4, sizes={"train": 5, "val": 0, "test": 0}, corrupt=True)
    source = flickr_source(root, "train", split_file)
    broken = [p.name for p in source.images].index("broken.jpg")
    dataset = VLPairDataset(source, pretrain_transform(32), per_image=True, seed=0)
    collate = VLCollator(FakeTokenizer(), max_query_len=6, max_target_len=12)
    items = [dataset[(i, 0, 0)] for i in range(len(dataset))]
    assert items[broken]["image"] is None and "broken.jpg" in caplog.text
    batch = collate(items)
    assert batch.skipped.item() == 1 and len(batch) == 4
    assert batch.pixels.shape == (4, 3, 32, 32) and batch.pixels.dtype == torch.uint8 and batch.tokens is None
    assert batch.labels.dtype == torch.long
    assert batch.labels.tolist() == [item["key"] for i, item in enumerate(items) if i != broken]
    for role, length in (("query", 6), ("target", 12)):
        text = batch.text[role]
        assert text["input_ids"].shape == text["attention_mask"].shape == (4, length)
        assert text["input_ids"].dtype == torch.long
    expected = FakeTokenizer()([item["target"] for i, item in enumerate(items) if i != broken], 12)
    assert torch.equal(batch.text["target"]["input_ids"], expected["input_ids"])
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        VLPairDataset(source, pretrain_transform(32), per_image=True, seed=0, on_corrupt="raise")[(broken, 0, 0)]
    with pytest.raises(RuntimeError, match="every item of a batch of 1 was a corrupt image"):
        collate([items[broken]])
    with pytest.raises(ValueError, match=r"tokenizer's output lacks \['attention_mask'\]"):
        VLCollator(lambda texts, n: {"input_ids": torch.zeros(len(texts), n)}, 4, 4)(items[:1])


def test_collator_accepts_items_without_query():
    collate = VLCollator(FakeTokenizer(), max_query_len=4, max_target_len=4)
    items = [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "query": q, "target": "ab", "key": 0, "index": i}
             for i, q in enumerate(["", "hi"])]
    batch = collate(items)
    assert batch.text["query"]["attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]
