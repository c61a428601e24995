"""V-JEPA end to end on real clips through train.py: the loss falls, resume is exact, export round-trips."""
import math

import pytest
import torch

import train
from jepa.export import export_encoder, load_export
from jepa.reader import load_checkpoint_encoder

from conftest import REPO
from test_train_e2e import assert_same_weights

VIDEOS = REPO.parent / "shared" / "data" / "videos"
CONFIG = str(REPO / "configs" / "vjepa" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """train/ and val/ with two classes of symlinks to the real clips (4 train, 2 val videos per class)."""
    if not VIDEOS.is_dir():
        raise FileNotFoundError(f"real test data missing: expected clips at {VIDEOS} (see ../shared/data)")
    root = tmp_path_factory.mktemp("clips")
    clips = sorted(VIDEOS.glob("*.mp4"))
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                (root / split / label / f"{i}.mp4").symlink_to(clips[(i + (label == "b")) % len(clips)])
    return root


def run(root, out, *overrides):
    return train.main(["--config", CONFIG, f"data.root={root}", f"trainer.output_dir={out}",
                       "trainer.progress_bar=false", *overrides])


def losses(text):
    return [float(line.split("loss ")[1].split()[0]) for line in text.splitlines()
            if line.startswith("step ") and "loss" in line]


def test_vjepa_trains_on_real_clips_and_resumes_exactly(clip_folder, tmp_path, capsys):
    run(clip_folder, tmp_path / "full", "trainer.max_steps=10", "optim.lr=3e-3", "monitor.knn_every=0")
    out = capsys.readouterr().out
    curve = losses(out)
    assert len(curve) == 10 and all(math.isfinite(v) for v in curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    assert "kNN accuracy (k=20): random init" in out
    common = ("optim.lr=3e-3", "monitor.knn_every=0", "optim.schedule_steps=10", "trainer.checkpoint_every=5")
    run(clip_folder, tmp_path / "split", "trainer.max_steps=5", *common)
    run(clip_folder, tmp_path / "split", "trainer.max_steps=10", *common)
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(tmp_path / "full" / "checkpoint-00000010", tmp_path / "split" / "checkpoint-00000010")


def test_vjepa_with_sigreg_trains_and_resumes_exactly(clip_folder, tmp_path, capsys):
    """The I-JEPA loss options (here λ SIGReg on the context embeddings, slices redrawn per step) apply to V-JEPA."""
    sigreg = ("loss.sigreg_weight=0.5", "sigreg.num_slices=16", "optim.lr=3e-3", "monitor.knn_every=0",
              "optim.schedule_steps=6", "trainer.checkpoint_every=3")
    run(clip_folder, tmp_path / "full", "trainer.max_steps=6", *sigreg)
    out = capsys.readouterr().out
    assert len(losses(out)) == 6 and all(math.isfinite(v) for v in losses(out))
    run(clip_folder, tmp_path / "split", "trainer.max_steps=3", *sigreg)
    run(clip_folder, tmp_path / "split", "trainer.max_steps=6", *sigreg)
    assert_same_weights(tmp_path / "full" / "checkpoint-00000006", tmp_path / "split" / "checkpoint-00000006")
    plain = tmp_path / "plain"
    run(clip_folder, plain, "trainer.max_steps=6", *sigreg[2:], "loss.sigreg_weight=0")
    with pytest.raises(AssertionError):  # the regulariser changes the weights
        assert_same_weights(tmp_path / "full" / "checkpoint-00000006", plain / "checkpoint-00000006")


def test_vjepa_rope_encoder_exports_to_vjepa2_and_back(clip_folder, tmp_path):
    run(clip_folder, tmp_path / "run", "trainer.max_steps=2", "trainer.checkpoint_every=2", "model.pos=rope",
        "monitor.knn_every=0")
    export_encoder(tmp_path / "run", "vjepa2", tmp_path / "hf")
    encoder, _, _ = load_checkpoint_encoder(tmp_path / "run")
    again, _, meta = load_export(tmp_path / "hf")
    assert meta["vjepa2_max_abs_diff"] < 1e-4
    clip = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(clip), encoder(clip), rtol=0, atol=1e-6)
