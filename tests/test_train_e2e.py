"""train.py end to end on real Imagenette images: loss falls, exact resume across processes, checkpoints."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from jepa.checkpoint import CheckpointError, checkpoint_dirs

from conftest import REPO, TINY

BASE = TINY + ["trainer.checkpoint_every=2", "trainer.keep_checkpoints=5"]


def run_train(root, out, *overrides, subprocess_run=False):
    args = BASE + [f"data.root={root}", f"trainer.output_dir={out}", *overrides]
    if subprocess_run:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout
    return train.main(args)


def weights(ckpt):
    """The online model and every teacher of a checkpoint (its ``*.safetensors`` but the RNG states)."""
    files = sorted(p for p in ckpt.glob("*.safetensors") if not p.name.startswith("rng_state"))
    assert any(p.name == "model.safetensors" for p in files) and len(files) >= 2, files
    return [load_file(str(p)) for p in files]


def assert_same_weights(ckpt_a, ckpt_b):
    """Online and teacher weights of two checkpoints are bit-identical."""
    assert len(weights(ckpt_a)) == len(weights(ckpt_b))
    for state_a, state_b in zip(weights(ckpt_a), weights(ckpt_b)):
        assert state_a.keys() == state_b.keys()
        for name in state_a:
            assert torch.equal(state_a[name], state_b[name]), name


def test_loss_falls_on_real_images(imagenette_small, tmp_path, capsys):
    run_train(imagenette_small, tmp_path, "trainer.max_steps=30", "optim.lr=2e-3", "optim.warmup_steps=3",
              "loss.kind=l2", "monitor.knn_every=0")
    out = capsys.readouterr().out
    losses = [float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")
              and "loss" in line]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert "kNN accuracy (k=20): random init" in out
    assert "resolved config:" in out


@pytest.mark.slow
def test_exact_resume_in_a_new_process(imagenette_small, tmp_path):
    common = ("trainer.checkpoint_every=3", "optim.schedule_steps=6", "model.drop_path=0.1", "data.num_workers=1",
              "monitor.knn_every=0")
    run_train(imagenette_small, tmp_path / "full", "trainer.max_steps=6", *common, subprocess_run=True)
    run_train(imagenette_small, tmp_path / "split", "trainer.max_steps=3", *common, subprocess_run=True)
    log = run_train(imagenette_small, tmp_path / "split", "trainer.max_steps=6", *common, subprocess_run=True)
    assert "resumed from" in log and "at step 3" in log
    assert_same_weights(tmp_path / "full" / "checkpoint-00000006", tmp_path / "split" / "checkpoint-00000006")
    state = json.loads((tmp_path / "split" / "checkpoint-00000006" / "train_state.json").read_text())
    assert state["step"] == 6 and state["schedules"]["lr"]["current"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(imagenette_small, tmp_path, monkeypatch):
    run_train(imagenette_small, tmp_path, "trainer.max_steps=2")
    good = weights(tmp_path / "checkpoint-00000002")
    import jepa.methods.latent_prediction

    monkeypatch.setattr(jepa.methods.latent_prediction, "latent_loss",
                        lambda pred, target, kind, padding=None: pred.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan before step 3"):
        run_train(imagenette_small, tmp_path, "trainer.max_steps=6")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-00000002"]
    for before, after in zip(good, weights(tmp_path / "checkpoint-00000002")):
        for name in before:
            assert torch.equal(before[name], after[name])


def test_mismatched_or_corrupt_checkpoint_fails_loudly(imagenette_small, tmp_path):
    run_train(imagenette_small, tmp_path, "trainer.max_steps=2", "monitor.knn_every=0")
    with pytest.raises(CheckpointError, match=r"model.depth: checkpoint 2 vs now 3"):
        run_train(imagenette_small, tmp_path, "trainer.max_steps=4", "model.depth=3")
    (tmp_path / "checkpoint-00000002" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="is corrupt or unreadable"):
        run_train(imagenette_small, tmp_path, "trainer.max_steps=4")
    (tmp_path / "checkpoint-00000002" / "target_encoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"is incomplete: missing \['target_encoder.safetensors'\]"):
        run_train(imagenette_small, tmp_path, "trainer.max_steps=4")


@pytest.mark.parametrize("backbone", ["transformer", "mamba3", "hybrid"])
def test_every_predictor_backbone_trains_through_train_py(imagenette_small, tmp_path, backbone, capsys):
    run_train(imagenette_small, tmp_path, "trainer.max_steps=4", "optim.lr=2e-3", f"predictor.backbone={backbone}",
              "predictor.pattern=MA", "predictor.depth=2", "predictor.d_state=16", "predictor.headdim=16",
              "monitor.knn_every=0", "data.batch_size=16")
    losses = [float(line.split("loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("step ") and "loss" in line]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    state = load_file(str(tmp_path / "checkpoint-00000004" / "model.safetensors"))
    kinds = {"transformer": "attn.qkv", "mamba3": "in_proj", "hybrid": "in_proj"}
    assert any(kinds[backbone] in name for name in state if name.startswith("predictor.backbone"))


def run_ddp(root, out, *overrides):
    """train.py in 2 CPU processes (torchrun + gloo)."""
    args = BASE + [f"data.root={root}", f"trainer.output_dir={out}", *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_two_process_ddp_resume_is_exact(imagenette_small, tmp_path):
    common = ("trainer.checkpoint_every=2", "optim.schedule_steps=4", "model.drop_path=0.1", "data.num_workers=0",
              "monitor.knn_every=0", "data.batch_size=4")
    run_ddp(imagenette_small, tmp_path / "full", "trainer.max_steps=4", *common)
    run_ddp(imagenette_small, tmp_path / "split", "trainer.max_steps=2", *common)
    log = run_ddp(imagenette_small, tmp_path / "split", "trainer.max_steps=4", *common)
    assert "resumed from" in log and "at step 2" in log
    for rank in (0, 1):
        assert (tmp_path / "split" / "checkpoint-00000004" / f"rng_state_{rank}.safetensors").is_file()
    assert_same_weights(tmp_path / "full" / "checkpoint-00000004", tmp_path / "split" / "checkpoint-00000004")
