"""`jepa eval` / `jepa export` end to end on a few real Imagenette images per class."""
import json
import subprocess
import sys

import pytest

from eval.splits import write_split_file
from eval.tasks import load_eval_config
from jepa.cli import main
from jepa.config import ConfigError

from conftest import REPO
from eval_helpers import make_checkpoint

VIT = ("model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.patch_size=8", "data.img_size=32")


def common(data, out, cache):
    return ["--data", str(data), "--out", str(out), f"features.cache_dir={cache}", "features.num_workers=0",
            "features.progress_bar=false", "features.batch_size=32"]


def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_knn_linear_lowshot_attentive_with_random_timm(imagenette_small, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = common(imagenette_small, out, cache) + ["features.img_size=32"]
    main(["eval", "knn", "--encoder", "timm:resnet10t", *args])
    text = capsys.readouterr().out
    assert "k    top-1 %  top-5 %" in text and "train: 80 images" in text and "(extracted" in text
    main(["eval", "linear", "--encoder", "timm:resnet10t", *args, "linear.epochs=5", "linear.lrs=[0.01,0.1]",
          "linear.weight_decays=[0.0]"])
    text = capsys.readouterr().out
    assert "(cache hit" in text and "top-1 best-of-grid" in text and "selected on held-out train" in text
    assert (out / "confusion_linear.png").stat().st_size > 1000
    main(["eval", "lowshot", "--encoder", "timm:resnet10t", *args, "lowshot.shots=[1,2]", "lowshot.seeds=[0,1]",
          "lowshot.max_iter=50"])
    text = capsys.readouterr().out
    assert "shots/class" in text and "±" in text
    assert (out / "lowshot.png").stat().st_size > 1000
    main(["eval", "attentive", "--encoder", "timm:vit_tiny_patch16_224", *args, "attentive.epochs=1",
          "attentive.lrs=[0.001]", "attentive.weight_decays=[0.01]"])
    assert "attentive probe" in capsys.readouterr().out
    written = records(out)
    assert {r["task"] for r in written} == {"knn", "linear", "lowshot", "attentive"}
    assert set(written[0]) >= {"task", "data", "encoder", "metric", "value", "seed", "config"}
    metrics = {(r["task"], r["metric"]) for r in written}
    assert {("knn", "top1@k=20"), ("linear", "top1_selected"), ("linear", "top1_best_of_grid"),
            ("lowshot", "top1@2shot_mean"), ("lowshot", "top1@2shot_std"), ("attentive", "top1_selected")} <= metrics
    for r in written:
        assert 0.0 <= r["value"] <= 1.0


def test_checkpoint_export_and_split_file(imagenette_small, tmp_path, capsys):
    run = tmp_path / "run"
    make_checkpoint(run, *VIT, seed=1)
    out, cache = tmp_path / "out", tmp_path / "cache"
    main(["eval", "knn", "--encoder", str(run), *common(imagenette_small, out, cache), "knn.ks=[5]"])
    text = capsys.readouterr().out
    assert "(checkpoint, target" in text and "32px" in text
    main(["export", "--ckpt", str(run), "--to", "timm", "--out", str(tmp_path / "timm_export")])
    main(["eval", "knn", "--encoder", str(tmp_path / "timm_export"), *common(imagenette_small, out, cache),
          "knn.ks=[5]"])
    text = capsys.readouterr().out
    assert "(export" in text and "(cache hit" in text  # same weights, same data: the checkpoint's features
    split = write_split_file(tmp_path / "split.txt", imagenette_small, per_class=3)
    main(["eval", "lowshot", "--encoder", str(run), *common(imagenette_small, out, cache),
          f"lowshot.split_file={split}", "lowshot.max_iter=50"])
    text = capsys.readouterr().out
    assert "train: 30 images" in text and "3-fold cross-validation" in text
    assert [r["metric"] for r in records(out)][-2:] == ["top1_split_file", "top5_split_file"]


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown config key 'linear.epoch'; closest valid keys: linear.epochs"):
        load_eval_config("linear", None, ["linear.epoch=3"])
    with pytest.raises(ConfigError, match=r"'linear.lrs\[1\]' expects a float"):
        load_eval_config("linear", None, ["linear.lrs=[0.1,fast]"])
    with pytest.raises(ConfigError, match="'attentive.depth' is 2"):
        load_eval_config("attentive", None, ["attentive.depth=2"])
    for task in ("linear", "attentive", "knn", "lowshot"):
        assert load_eval_config(task).seed == 0  # the shipped YAML files parse


def test_console_entry_in_a_fresh_process(imagenette_small, tmp_path):
    done = subprocess.run([sys.executable, "-m", "jepa.cli", "eval", "knn", "--encoder", "timm:nope_net",
                           "--data", str(imagenette_small)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode != 0 and "'timm:nope_net' is not a timm model name" in done.stderr
