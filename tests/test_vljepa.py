"""VL-JEPA as a method: trains through train.py on real Flickr captions, resumes exactly, cached tokens equal the
on-the-fly X-encoder, the Y-encoder trains at its LR multiplier, a small aligned set is memorised (R@1 = 1), eval
tasks print their tables, config errors name their keys."""
import math

import pytest
import torch

import train
from data.loaders import build_pretrain_loader
from data.transforms import DeviceNormalize
from eval.vl_embed import nearest_candidate, retrieval_recalls
from jepa.config import ConfigError, load_config
from jepa.methods import build_method
from jepa.trainer import param_groups

from conftest import REPO, make_flickr_subset
from test_train_e2e import assert_same_weights

CONFIG = str(REPO / "configs" / "vljepa" / "tiny_cpu.yaml")
SMALL = ["vl.x_encoder=random:vit_tiny", "data.img_size=32", "data.batch_size=8", "data.num_workers=0",
         "predictor.dim=64", "predictor.num_heads=2", "predictor.depth=1", "trainer.progress_bar=false",
         "trainer.log_every=1", "optim.warmup_steps=2", "data.max_target_len=24"]


@pytest.fixture(scope="module")
def flickr_small(tmp_path_factory):
    """24 real Flickr8k images with their captions, split 16/4/4 by a split file of their own."""
    return make_flickr_subset(tmp_path_factory.mktemp("flickr"))


def overrides(flickr, out, *extra):
    root, split = flickr
    return ["--config", CONFIG, *SMALL, f"data.root={root}", f"data.split_file={split}",
            f"trainer.output_dir={out}", f"data.token_cache_dir={out.parent / 'cache'}", *extra]


def losses(text):
    return [float(line.split("loss ")[1].split()[0]) for line in text.splitlines()
            if line.startswith("step ") and "loss" in line]


def test_vljepa_trains_through_train_py_and_resumes_exactly(flickr_small, tmp_path, capsys):
    common = ("optim.lr=3e-3", "optim.schedule_steps=8", "trainer.checkpoint_every=4")
    train.main(overrides(flickr_small, tmp_path / "full", "trainer.max_steps=8", *common))
    out = capsys.readouterr().out
    curve = losses(out)
    assert len(curve) == 8 and all(math.isfinite(v) for v in curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    assert "monitor r1_i2t: random init" in out
    train.main(overrides(flickr_small, tmp_path / "split", "trainer.max_steps=4", *common))
    train.main(overrides(flickr_small, tmp_path / "split", "trainer.max_steps=8", *common))
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(tmp_path / "full" / "checkpoint-00000008", tmp_path / "split" / "checkpoint-00000008")


def test_cached_tokens_give_the_on_the_fly_loss(flickr_small, tmp_path):
    losses_by_mode = {}
    for cached in (False, True):
        cfg = load_config(CONFIG, SMALL[:-1] + [f"data.root={flickr_small[0]}", f"data.split_file={flickr_small[1]}",
                                                f"data.cache_tokens={cached}", "data.cache_dtype=fp32",
                                                f"data.token_cache_dir={tmp_path}", "trainer.seed=3"])
        torch.manual_seed(0)
        parts = build_method(cfg)
        loader, sampler = build_pretrain_loader("vl_pairs", cfg, parts, pin_memory=False)
        sampler.set_position(0, 0)
        batch = DeviceNormalize()(next(iter(loader)))
        assert (batch.tokens is not None) == cached and (batch.pixels is None) == cached
        teachers = {name: t.module for name, t in parts.teachers.items()}
        losses_by_mode[cached] = parts.model(batch, teachers).loss
    torch.testing.assert_close(losses_by_mode[True], losses_by_mode[False], rtol=0, atol=1e-5)


def test_y_encoder_trains_at_its_lr_multiplier(flickr_small):
    cfg = load_config(CONFIG, SMALL + [f"data.root={flickr_small[0]}", "vl.y_lr_mult=0.05"])
    parts = build_method(cfg)
    groups = param_groups(parts.model)
    y_params = {id(p) for p in parts.model.y_encoder.parameters()}
    for group in groups:
        in_y = {id(p) in y_params for p in group["params"]}
        assert len(in_y) == 1, "a group mixes Y-encoder and other parameters"
        assert group["lr_mult"] == (0.05 if in_y == {True} else 1.0)
    assert "x_encoder" in parts.teachers and "y_encoder" not in parts.teachers
    frozen = build_method(load_config(CONFIG, SMALL + [f"data.root={flickr_small[0]}", "vl.y_lr_mult=0"]))
    assert "y_encoder" in frozen.teachers and not hasattr(frozen.model, "y_encoder")


def test_a_small_aligned_set_is_memorised(flickr_small):
    """8 images, one caption each, frozen random X, frozen MiniLM Y: the predictor learns the map (R@1 -> 1)."""
    cfg = load_config(CONFIG, SMALL + [f"data.root={flickr_small[0]}", f"data.split_file={flickr_small[1]}",
                                       "vl.y_lr_mult=0", "vl.query_embedding=learned", "loss.learn_temperature=false",
                                       "data.cache_tokens=false"])
    torch.manual_seed(0)
    parts = build_method(cfg)
    loader, sampler = build_pretrain_loader("vl_pairs", cfg, parts, pin_memory=False)
    sampler.set_position(0, 0)
    batch = DeviceNormalize()(next(iter(loader)))
    teachers = {name: t.module for name, t in parts.teachers.items()}
    optimizer = torch.optim.AdamW(parts.model.parameters(), lr=2e-3)
    for _ in range(60):
        loss = parts.model(batch, teachers).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    embedder = parts.monitor_encoder.eval()
    images = embedder.image_query(batch.pixels, batch.text["query"])
    texts = embedder.text(batch.text["target"])
    recalls = retrieval_recalls(images, texts, torch.arange(len(texts)), [1])
    assert recalls["image_to_text"][1] == 1.0 and recalls["text_to_image"][1] == 1.0, recalls


def test_vqa_answer_selection_picks_the_matching_candidate():
    candidates = torch.nn.functional.normalize(torch.randn(13, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    truth = torch.tensor([3, 0, 12, 7, 7])
    pred = torch.nn.functional.normalize(candidates[truth] + 0.05 * torch.randn(5, 32), dim=1)
    assert torch.equal(nearest_candidate(pred, candidates), truth)


def test_eval_tasks_print_their_tables(flickr_small, tmp_path, capsys):
    from eval.cli import main as eval_main

    run = tmp_path / "run"
    train.main(overrides(flickr_small, run, "trainer.max_steps=2", "trainer.checkpoint_every=2"))
    capsys.readouterr()
    records = eval_main(["vl-retrieval", "--encoder", str(run), "--data", str(flickr_small[0]),
                         "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "image to text" in out and "R@5 %" in out
    assert {r.metric for r in records} >= {"image_to_text_R@1", "text_to_image_R@10"}
    assert all(0 <= r.value <= 1 for r in records)
    from conftest import make_subset

    folder = make_subset(tmp_path / "imagenette", 1, 2, classes=3)
    records = eval_main(["vl-classify", "--encoder", str(run), "--data", str(folder), "--out", str(tmp_path / "eval")])
    assert "zero-shot top-1 %" in capsys.readouterr().out and records[0].metric == "zero_shot_top1"
    records = eval_main(["vqa", "--encoder", str(run), "--out", str(tmp_path / "eval"), "vqa.limit=24"])
    assert "question type" in capsys.readouterr().out and records[-1].metric == "accuracy"
    records = eval_main(["vl-caption", "--encoder", str(run), "--data", str(flickr_small[0]), "--out",
                         str(tmp_path / "eval"), "vl_caption.epochs=1", "vl_caption.decoder.dim=32",
                         "vl_caption.decoder.depth=1", "vl_caption.decoder.num_heads=2"])
    out = capsys.readouterr().out
    assert "CIDEr-D" in out and {r.metric for r in records} == {"bank/BLEU-4", "bank/CIDEr-D", "generative/BLEU-4",
                                                               "generative/CIDEr-D"}
    assert (tmp_path / "eval" / "y_decoder.safetensors").is_file()


@pytest.mark.parametrize("extra, message", [
    (["data.cache_tokens=true", "vl.x_lr_mult=0.1"], "cached tokens need a frozen X-encoder"),
    (["data.cache_tokens=true", "data.augment=true"], "set data.augment=false"),
    (["predictor.init=minilm"], "predictor."),
    (["predictor.causal=true", "predictor.backbone=mamba3"], "predictor.bidirectional=forward"),
    (["loss.regularizer=sigreg"], "loss.reg_weight is 0"),
    (["vl.x_encoder=/no/such/run"], "vl.x_encoder"),
    (["vl.y_encoder=bert"], "vl.y_encoder"),
    (["data.source=coco"], "data.source"),
])
def test_bad_vl_configs_name_their_keys(extra, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace(".", r"\.")):
        build_method(load_config(CONFIG, SMALL + extra))
