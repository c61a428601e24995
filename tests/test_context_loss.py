"""V-JEPA 2.1's options on the shared latent-prediction core (I-JEPA and V-JEPA): the context loss with its ramp and
distance weighting, multi-layer targets; off by default, where the method is exactly the plain one."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from data.batch import Batch
from data.loaders import clip_mask_samplers
from encoders.vit import gather_tokens
from jepa.config import ConfigError, load_config
from jepa.losses import latent_loss
from jepa.masks import MultiBlockMaskSampler
from jepa.methods import build_method
from jepa.methods.ijepa import target_blocks
from jepa.methods.latent_prediction import context_distance_weights
from jepa.schedules import LinearRampWeight

from conftest import REPO
from test_train_e2e import assert_same_weights, run_train
from test_vjepa import clip_folder, losses, run as run_vjepa  # noqa: F401 (clip_folder: a fixture)

IJEPA = ["model.encoder=vit_tiny", "model.depth=2", "model.embed_dim=32", "model.num_heads=4", "model.patch_size=4",
         "data.img_size=32", "predictor.depth=1", "predictor.dim=32", "predictor.num_heads=4"]
VJEPA_CONFIG = str(REPO / "configs" / "vjepa" / "tiny_cpu.yaml")
ALL_ON = ["loss.context_weight=0.5", "loss.context_distance_weighting=true", "loss.target_layers=2"]


def tiny(method: str, *overrides: str, seed: int = 0):
    """(cfg, parts, a fixed batch) of a tiny I-JEPA (16 px tokens grid 8x8) or V-JEPA (4x4x4 grid) model."""
    cfg = (load_config(None, IJEPA + list(overrides)) if method == "ijepa"
           else load_config(VJEPA_CONFIG, list(overrides)))
    torch.manual_seed(seed)
    parts = build_method(cfg)
    generator = torch.Generator().manual_seed(1)
    if method == "ijepa":
        sampler = MultiBlockMaskSampler(parts.token_grid, min_keep=4)
        batch = Batch(pixels=torch.randn(4, 3, 32, 32, generator=generator), masks=[sampler(4, (0,))])
    else:
        batch = Batch(pixels=torch.randn(3, 3, 8, 32, 32, generator=generator),
                      masks=[s(3, (0,)) for s in clip_mask_samplers(cfg, parts.token_grid)])
    return cfg, parts, batch


def teachers(parts) -> dict:
    return {name: t.module for name, t in parts.teachers.items()}


@pytest.mark.parametrize("method", ["ijepa", "vjepa"])
def test_defaults_are_the_plain_method_bit_for_bit(method):
    """Off by default: the state dict gains nothing and the loss is the plain latent-prediction loss, computed here
    by hand; with the context loss on but its weight still 0 (before the ramp starts) the loss is the same too."""
    cfg, parts, batch = tiny(method)
    model, teacher = parts.model, teachers(parts)
    assert not any(key.startswith("context_ramp") or "context_proj" in key for key in model.state_dict())
    assert model.predictor.proj.out_features == model.context_encoder.embed_dim
    loss = model(batch, teacher).loss

    with torch.no_grad():
        features = teacher["target_encoder"](batch.pixels)
        features = F.layer_norm(features, features.shape[-1:])
    grid = model.context_encoder.token_grid(batch.pixels.shape[1:])
    per_set = []
    for masks in batch.masks:
        size, num_targets, target_len = masks.target_idx.shape
        target = gather_tokens(features, masks.target_idx.reshape(size, -1)).reshape(size, num_targets, target_len, -1)
        context = model.context_encoder(batch.pixels, masks.context_idx, masks.context_attention_pad)
        pred = model.predictor(context, masks.context_idx, masks.context_attention_pad, masks.target_idx, grid,
                               masks.target_attention_pad)
        per_set.append(latent_loss(pred, target, cfg.loss.kind, masks.target_pad))
    assert torch.equal(loss, per_set[0] if len(per_set) == 1 else torch.stack(per_set).mean())

    _, waiting, _ = tiny(method, "loss.context_weight=0.5", "loss.context_start_step=100",
                         "loss.context_distance_weighting=true")
    missing, unexpected = waiting.model.load_state_dict(model.state_dict(), strict=False)
    assert sorted(missing) == ["context_ramp.calls", "predictor.context_proj.bias", "predictor.context_proj.weight"]
    assert not unexpected
    out = waiting.model(batch, teacher)
    assert torch.equal(out.loss, loss) and float(out.logs["context_weight"]) == 0.0
    assert all(torch.isfinite(v) for k, v in out.logs.items() if k.startswith("context_loss"))


def test_context_weight_is_the_closed_form_ramp_and_its_count_is_model_state():
    def closed_form(step, final=0.3, start=2, warmup=4):
        return final * min(max((step - start) / warmup, 0.0), 1.0)

    ramp = LinearRampWeight(0.3, warmup=4, start=2, calls_per_step=2)  # 2 micro-batches per optimizer step
    values = [float(ramp()) for _ in range(20)]
    assert values == pytest.approx([closed_form(call // 2) for call in range(20)], abs=1e-7)
    assert [ramp.at(step) for step in range(10)] == pytest.approx([closed_form(step) for step in range(10)])
    ramp.eval()
    ramp()
    assert int(ramp.calls) == 20  # evaluation calls do not advance it
    again = LinearRampWeight(0.3, warmup=4, start=2, calls_per_step=2)
    again.load_state_dict(ramp.state_dict())  # a checkpoint's count continues the ramp
    assert float(again()) == pytest.approx(closed_form(10))
    jump = LinearRampWeight(0.5, warmup=0, start=3)
    assert [float(jump()) for _ in range(5)] == [0.0, 0.0, 0.0, 0.5, 0.5]

    _, parts, batch = tiny("ijepa", "loss.context_weight=0.2", "loss.context_warmup_steps=2",
                           "trainer.grad_accum_steps=2")
    assert parts.model.context_ramp.calls_per_step == 2
    logged = [float(parts.model(batch, teachers(parts)).logs["context_weight"]) for _ in range(6)]
    assert logged == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2, 0.2])


def brute_force_weights(masks, grid, scale):
    """{(b, k, i): 1 / sqrt(max(1, distance to the nearest real target) / scale)} over the real context tokens."""
    out = {}
    size, num_targets, target_len = masks.target_idx.shape
    for b in range(size):
        for k in range(num_targets):
            targets = [np.unravel_index(int(masks.target_idx[b, k, j]), grid) for j in range(target_len)
                       if masks.target_pad is None or not masks.target_pad[b, k, j]]
            for i in range(masks.context_idx.shape[1]):
                if masks.context_pad[b, i]:
                    continue
                here = np.unravel_index(int(masks.context_idx[b, i]), grid)
                nearest = min(math.dist(here, there) for there in targets)
                out[b, k, i] = 1 / math.sqrt(max(nearest, 1.0) / scale)
    return out


@pytest.mark.parametrize("grid, union", [((6, 7), False), ((3, 4, 5), True)])
def test_distance_weights_and_weighted_loss_equal_a_brute_force_computation(grid, union):
    """2-D I-JEPA masks (4 target blocks, padded contexts) and 3-D V-JEPA masks (one union, padded contexts and
    targets): the vectorised weights are the per-token loop's, padding ignored; so is the weighted context loss."""
    sampler = (MultiBlockMaskSampler(grid, num_targets=2, target_scale=(0.1, 0.3), num_context=0, target_union=True,
                                     min_keep=2) if union
               else MultiBlockMaskSampler(grid, num_targets=4, target_scale=(0.1, 0.2), min_keep=2))
    masks = sampler(6, (3,))
    assert masks.context_pad.any() and (not union or masks.target_pad.any())  # padding is there to be ignored
    weights = context_distance_weights(masks.context_idx, masks.target_idx, masks.target_attention_pad, grid, 2.0)
    expected = brute_force_weights(masks, grid, 2.0)
    assert weights.shape == (6, masks.target_idx.shape[1], masks.context_idx.shape[1])
    for (b, k, i), value in expected.items():
        assert float(weights[b, k, i]) == pytest.approx(value, rel=1e-6), (b, k, i)

    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(*weights.shape, 5, generator=generator)
    target = torch.randn(*weights.shape, 5, generator=generator)
    padding = masks.context_pad.unsqueeze(1).expand_as(weights)
    loss = latent_loss(pred, target, "l1", padding, weights)
    by_hand = sum(w * float((pred[b, k, i] - target[b, k, i]).abs().sum()) for (b, k, i), w in expected.items())
    assert float(loss) == pytest.approx(by_hand / (len(expected) * 5), rel=1e-5)


def test_multi_layer_targets_are_the_named_blocks_layer_normed_and_concatenated():
    assert target_blocks(12, 4, "even") == (2, 5, 8, 11)  # V-JEPA 2.1's levels
    assert target_blocks(24, 4, "even") == (5, 11, 17, 23)
    assert target_blocks(40, 4, "even") == (9, 19, 29, 39)
    assert target_blocks(4, 2, "even") == (1, 3) and target_blocks(4, 2, "last") == (2, 3)
    assert target_blocks(4, 1, "even") == target_blocks(4, 1, "last") == (3,)

    def layer_norm(x):
        return F.layer_norm(x, x.shape[-1:])

    _, one, batch = tiny("ijepa", "model.depth=4")
    encoder, pixels = one.teachers["target_encoder"].module, batch.pixels
    with torch.no_grad():
        assert torch.equal(one.model.target_features(encoder, pixels), layer_norm(encoder(pixels)))  # k = 1: today's
        assert torch.equal(encoder.block_outputs(pixels, [3])[0], encoder(pixels))
        levels = encoder.intermediate_layers(pixels, 4)  # blocks 0..3
    for spacing, picked in (("even", (1, 3)), ("last", (2, 3))):
        _, two, _ = tiny("ijepa", "model.depth=4", "loss.target_layers=2", f"loss.target_layer_spacing={spacing}")
        assert two.model.target_blocks == picked and two.model.predictor.proj.out_features == 2 * 32
        two.teachers["target_encoder"].module.load_state_dict(encoder.state_dict())
        expected = torch.cat([layer_norm(levels[i]) for i in picked], -1)
        assert torch.equal(two.model.target_features(two.teachers["target_encoder"].module, pixels), expected)
    out = two.model(batch, teachers(two))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.features["pred"].shape[-1] == 64

    _, video, clips = tiny("vjepa", "loss.target_layers=2")  # depth 2: both blocks
    encoder = video.teachers["target_encoder"].module
    with torch.no_grad():
        expected = torch.cat([layer_norm(x) for x in encoder.intermediate_layers(clips.pixels, 2)], -1)
        assert torch.equal(video.model.target_features(encoder, clips.pixels), expected)


@pytest.mark.parametrize("overrides, match", [
    (["loss.target_layers=3"], r"'loss.target_layers' \(3\) must be <= the encoder depth \(2"),
    (["loss.target_layers=0"], r"'loss.target_layers' must be >= 1"),
    (["model.encoder=cnn:resnet18", "model.depth=null", "model.embed_dim=null", "model.num_heads=null",
      "loss.target_layers=2"], r"'loss.target_layers' is 2 but the encoder cnn:resnet18 is a CNN"),
    (["loss.context_weight=-1"], r"'loss.context_weight' must be >= 0"),
    (["loss.context_distance_weighting=true"], r"'loss.context_distance_weighting' is set but loss.context_weight is 0"),
    (["loss.context_warmup_steps=10"], r"'loss.context_warmup_steps' is set but loss.context_weight is 0"),
    (["loss.context_weight=1", "loss.context_distance_scale=2"],
     r"'loss.context_distance_scale' is set but loss.context_distance_weighting is false"),
    (["loss.context_weight=1", "loss.context_distance_weighting=true", "loss.context_distance_scale=0"],
     r"'loss.context_distance_scale' must be > 0"),
])
def test_impossible_or_idle_options_name_their_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, IJEPA + overrides)
    if "cnn" not in overrides[0]:
        with pytest.raises(ConfigError, match=match):
            load_config(VJEPA_CONFIG, overrides)


@pytest.fixture
def no_monitors(monkeypatch):
    """The kNN monitor is not what these runs test (it costs seconds on video)."""
    monkeypatch.setattr(train, "build_training_monitors", lambda cfg: [])


def test_ijepa_with_every_option_learns_and_resumes_exactly_through_the_ramp(imagenette_small, tmp_path, capsys,
                                                                               no_monitors):
    """Context loss (distance-weighted) + 2-layer targets through train.py: the loss falls at a constant λ; with
    the ramp crossing the split (λ 0 at step 0, full from step 4) and 2 micro-batches per step, a resumed run ends
    bit-identical to an uninterrupted one, the ramp's call count included."""
    run_train(imagenette_small, tmp_path / "learn", "trainer.max_steps=6", "optim.lr=2e-3", *ALL_ON)
    curve = losses(capsys.readouterr().out)
    assert len(curve) == 6 and all(math.isfinite(v) for v in curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve

    common = (*ALL_ON, "loss.context_start_step=1", "loss.context_warmup_steps=3", "trainer.grad_accum_steps=2",
              "data.batch_size=4", "optim.schedule_steps=6", "trainer.checkpoint_every=3")
    run_train(imagenette_small, tmp_path / "full", "trainer.max_steps=6", *common)
    run_train(imagenette_small, tmp_path / "split", "trainer.max_steps=3", *common)
    run_train(imagenette_small, tmp_path / "split", "trainer.max_steps=6", *common)
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(tmp_path / "full" / "checkpoint-00000006", tmp_path / "split" / "checkpoint-00000006")
    state = load_file(str(tmp_path / "split" / "checkpoint-00000006" / "model.safetensors"))
    assert int(state["context_ramp.calls"]) == 12 and state["predictor.proj.weight"].shape[0] == 2 * 64


def test_vjepa_with_every_option_learns_on_real_clips(clip_folder, tmp_path, capsys, no_monitors):  # noqa: F811
    """The same options on V-JEPA (3-D distances on the 4x4x4 tubelet grid, two mask sets) through train.py."""
    run_vjepa(clip_folder, tmp_path, "trainer.max_steps=4", "optim.lr=3e-3", "trainer.plot=false", *ALL_ON)
    curve = losses(capsys.readouterr().out)
    assert len(curve) == 4 and all(math.isfinite(v) for v in curve)
    assert curve[-1] < curve[0], curve
    state = load_file(str(tmp_path / "checkpoint-00000004" / "model.safetensors"))
    assert int(state["context_ramp.calls"]) == 4 and state["predictor.context_proj.weight"].shape[0] == 2 * 96
