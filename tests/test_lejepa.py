"""SIGReg (against a float64 brute force and the closed form), multi-crop views (against torchvision), LeJEPA and
I-JEPA + SIGReg through train.py (loss falls, exact resume with per-step slices, health plot), shipped configs."""
import json
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torchvision.transforms.v2 import functional as TF

import train
from data.loaders import build_pretrain_loader
from data.multicrop import (ColorParams, MultiCropDeviceTransform, apply_color, blur_kernel_size, color_jitter,
                            gaussian_blur)
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from eval.health_plot import read_scalars
from jepa.cli import main as cli_main
from jepa.config import ConfigError, load_config
from jepa.losses import SIGReg, epps_pulley, sigreg
from jepa.methods import build_method

import sigreg_dist_worker
from conftest import REPO

LEJEPA_TINY = ["data.num_workers=0", "data.batch_size=8", "trainer.log_every=1", "trainer.progress_bar=false",
               "monitor.bank_per_class=4", "monitor.query_per_class=2", "monitor.batch_size=40", "monitor.knn_every=0",
               "trainer.checkpoint_every=0"]
IJEPA_TINY = ["model.encoder=vit_tiny", "model.depth=2", "model.embed_dim=64", "model.num_heads=2",
              "model.patch_size=8", "data.img_size=32", "predictor.depth=1", "predictor.dim=32",
              "predictor.num_heads=2", "masks.min_keep=2", "data.num_workers=0", "data.batch_size=16",
              "trainer.progress_bar=false", "trainer.log_every=1", "monitor.bank_per_class=4",
              "monitor.query_per_class=2", "monitor.batch_size=40", "monitor.knn_every=0", "loss.kind=l2",
              "optim.lr=2e-3", "optim.warmup_steps=2", "sigreg.num_slices=32", "trainer.checkpoint_every=0"]


# ------------------------------------------------------------------------------------------------ SIGReg
def brute_force_statistic(x: np.ndarray, num_points: int, t_max: float, half_line: bool) -> float:
    """N * ∫ |φ_N(t) − exp(−t²/2)|² exp(−t²/2) dt, the ECF as a complex mean, one knot at a time, in float64."""
    t = np.linspace(0.0 if half_line else -t_max, t_max, num_points)
    values = np.array([abs(np.mean(np.exp(1j * tk * x)) - np.exp(-tk ** 2 / 2)) ** 2 * np.exp(-tk ** 2 / 2)
                       for tk in t])
    integral = (t[1] - t[0]) * (values.sum() - 0.5 * (values[0] + values[-1]))
    return len(x) * integral * (2.0 if half_line else 1.0)


def closed_form_statistic(x: np.ndarray) -> float:
    """The exact integral over R (Gaussian integrals of cos): N [ (1/N²) Σ_jk √(2π) e^{−(x_j − x_k)²/2}
    − (2/N) Σ_j √π e^{−x_j²/4} + √(2π/3) ]."""
    n = len(x)
    pairs = np.sqrt(2 * np.pi) * np.exp(-(x[:, None] - x[None, :]) ** 2 / 2).sum() / n ** 2
    cross = 2 * np.sqrt(np.pi) * np.exp(-x ** 2 / 4).mean()
    return n * (pairs - cross + np.sqrt(2 * np.pi / 3))


@pytest.mark.parametrize("half_line", [True, False])
def test_epps_pulley_matches_float64_brute_force(half_line):
    generator = torch.Generator().manual_seed(0)
    samples = torch.cat([torch.randn(9, 2, generator=generator), 0.3 + 2 * torch.rand(9, 1, generator=generator)], 1)
    ours = epps_pulley(samples, num_points=17, t_max=3.0, half_line=half_line)
    expected = [brute_force_statistic(samples[:, m].double().numpy(), 17, 3.0, half_line) for m in range(3)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=2e-5)
    # leading axes are independent sets; a mask leaves rows out exactly
    stacked = epps_pulley(torch.stack([samples, samples[:5].repeat(2, 1)[:9]]), half_line=half_line)
    torch.testing.assert_close(stacked[0], ours)
    keep = torch.arange(9) < 6
    torch.testing.assert_close(epps_pulley(samples, half_line=half_line, mask=keep),
                               epps_pulley(samples[:6], half_line=half_line))


def test_epps_pulley_quadrature_converges_to_the_exact_integral():
    x = torch.randn(40, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = closed_form_statistic(x[:, 0].numpy())
    fine = epps_pulley(x, num_points=801, t_max=10.0).item()  # fp32 inside: a relative 1e-5 is its floor
    assert fine == pytest.approx(exact, rel=1e-4)
    # LeJEPA's 17 knots on [0, 3] stay within a few percent of the exact statistic
    assert epps_pulley(x, num_points=17, t_max=3.0).item() == pytest.approx(exact, rel=0.05)


def test_sigreg_near_its_floor_for_gaussians_and_large_for_collapsed():
    generator = torch.Generator().manual_seed(2)
    gaussian_expectation = math.sqrt(2 * math.pi) - math.sqrt(2 * math.pi / 3)  # ∫(1 − e^{−t²}) e^{−t²/2}, ≈ 1.06
    regularizer = SIGReg(num_slices=128, gather=False)
    values = [regularizer(torch.randn(512, 16, generator=generator)).item() for _ in range(8)]
    assert np.mean(values) == pytest.approx(gaussian_expectation, rel=0.1)
    gaussian = torch.randn(512, 16, generator=generator)
    one_point = gaussian[:1].expand(512, -1)  # every row the same sample
    line = gaussian[:, :1] * torch.ones(1, 16) / 4  # rank one: every direction sees one 1-D law, wrongly scaled
    for collapsed in (one_point, line, 10 * gaussian, torch.zeros(512, 16)):
        assert regularizer(collapsed).item() > 30 * gaussian_expectation
    # the legacy (B, D) function and the module agree on the same directions
    directions = regularizer.directions(16, "cpu")
    torch.testing.assert_close(epps_pulley(gaussian @ directions).mean(), regularizer.eval()(gaussian))
    assert sigreg(gaussian, generator=torch.Generator().manual_seed(3)).item() < 2 * gaussian_expectation


def test_sigreg_slices_follow_seed_and_step_and_resume_from_the_state_dict():
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    first, again, other = SIGReg(32, seed=1), SIGReg(32, seed=1), SIGReg(32, seed=2)
    run = [first(z).item() for _ in range(4)]
    assert run == [again(z).item() for _ in range(4)] and int(first.draws) == 4
    assert len(set(run)) == 4 and run[0] != other(z).item()  # fresh slices every call, another seed others
    resumed = SIGReg(32, seed=1)
    halfway = SIGReg(32, seed=1)
    [halfway(z) for _ in range(2)]
    resumed.load_state_dict(halfway.state_dict())  # what a checkpoint restores
    assert [resumed(z).item() for _ in range(2)] == run[2:]
    resumed.eval()
    assert resumed(z).item() == resumed(z).item() and int(resumed.draws) == 4  # eval calls do not advance
    loss = first(z)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.slow
def test_sigreg_all_reduce_two_processes_equals_the_global_batch(tmp_path):
    mp.spawn(sigreg_dist_worker.rank_main, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    loss, grad = sigreg_dist_worker.sigreg_and_grad(sigreg_dist_worker.full_views())
    for rank_loss, _ in ranks:
        torch.testing.assert_close(rank_loss, loss, rtol=1e-5, atol=1e-6)
    # each rank's rows get W x the global gradient; DDP's mean over the W ranks gives it back exactly
    torch.testing.assert_close(torch.cat([g for _, g in ranks], 1) / 2, grad, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------ views
def _params(n, **fields):
    base = dict(brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n), hue=torch.zeros(n),
                order=torch.arange(4).repeat(n, 1), grayscale=torch.zeros(n, dtype=torch.bool),
                blur_sigma=torch.zeros(n), solarize=torch.zeros(n, dtype=torch.bool))
    return ColorParams(**{**base, **fields})


def test_color_ops_match_torchvision_per_image_in_each_images_order():
    generator = torch.Generator().manual_seed(6)
    images = torch.rand(4, 3, 20, 24, generator=generator)
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    params = _params(4, brightness=torch.tensor([1.3, 0.7, 1.0, 0.9]), contrast=torch.tensor([0.6, 1.4, 1.2, 1.0]),
                     saturation=torch.tensor([1.5, 0.2, 0.8, 1.1]), hue=torch.tensor([0.08, -0.1, 0.0, 0.03]),
                     order=orders)
    ops = [lambda x, i: TF.adjust_brightness(x, params.brightness[i].item()),
           lambda x, i: TF.adjust_contrast(x, params.contrast[i].item()),
           lambda x, i: TF.adjust_saturation(x, params.saturation[i].item()),
           lambda x, i: TF.adjust_hue(x, params.hue[i].item())]
    expected = []
    for i in range(4):
        x = images[i:i + 1]
        for op in orders[i].tolist():
            x = ops[op](x, i)
        expected.append(x)
    torch.testing.assert_close(color_jitter(images, params), torch.cat(expected), rtol=0, atol=2e-5)
    # grayscale, blur (each image its own sigma; 0: unchanged), solarize
    sigma = torch.tensor([0.0, 0.7, 1.6, 0.3])
    size = blur_kernel_size(24)
    blurred = gaussian_blur(images, sigma, size)
    assert torch.equal(blurred[0], images[0])
    for i in range(1, 4):
        reference = TF.gaussian_blur(images[i:i + 1], [size, size], [sigma[i].item()] * 2)
        torch.testing.assert_close(blurred[i:i + 1], reference, rtol=0, atol=1e-5)
    gray_solarized = apply_color(images, _params(4, grayscale=torch.tensor([True, False, True, False]),
                                                 solarize=torch.tensor([True, True, False, False])))
    torch.testing.assert_close(gray_solarized[0:1], TF.solarize(TF.rgb_to_grayscale(images[0:1], 3), 128 / 255))
    torch.testing.assert_close(gray_solarized[1:2], TF.solarize(images[1:2], 128 / 255))
    torch.testing.assert_close(gray_solarized[2:3], TF.rgb_to_grayscale(images[2:3], 3))
    assert torch.equal(gray_solarized[3], images[3])


def _first_views(root, tmp_path, where):
    cfg = load_config(REPO / "configs/lejepa/tiny_cpu.yaml", LEJEPA_TINY + [
        f"data.root={root}", f"trainer.output_dir={tmp_path}", f"augment.where={where}"])
    loader, _ = build_pretrain_loader("multicrop_images", cfg, build_method(cfg), pin_memory=False)
    return next(iter(loader))


def test_views_are_uint8_crops_and_device_and_worker_augmentation_agree(imagenette_small, tmp_path):
    on_device, in_workers = (_first_views(imagenette_small, tmp_path, where) for where in ("device", "workers"))
    global_views, local_views = on_device.views.crops
    assert global_views.shape == (8, 2, 3, 32, 32) and local_views.shape == (8, 2, 3, 16, 16)
    assert global_views.dtype == torch.uint8 and on_device.pixels is None and len(on_device) == 8
    assert on_device.views.color.hue.shape == (8, 4) and in_workers.views.color is None
    assert on_device.views.color.grayscale.any() and (on_device.views.color.hue != 0).any()
    transform = MultiCropDeviceTransform()
    device_crops, worker_crops = transform(on_device).views.crops, transform(in_workers).views.crops
    for a, b in zip(device_crops, worker_crops):
        assert a.dtype == torch.float32
        # the same per-sample parameters: only the workers' rounding to uint8 (half a level) separates them
        assert (a - b).abs().max() <= 0.5 / 255 / 0.224 + 1e-5
    # exactly the views with a colour operation drawn changed (the others are bit-for-bit normalised crops)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    c = on_device.views.color
    touched = ((c.brightness != 1) | (c.contrast != 1) | (c.saturation != 1) | (c.hue != 0) | c.grayscale
               | (c.blur_sigma > 0) | c.solarize)  # (B, V)
    plain = [(crop.float() / 255 - mean) / std for crop in on_device.views.crops]
    changed = torch.cat([(a - b).abs().amax((2, 3, 4)) > 1e-4 for a, b in zip(device_crops, plain)], 1)
    assert touched.any() and torch.equal(changed, touched)


# ------------------------------------------------------------------------------------------------ training
def losses_of(out: str) -> list[float]:
    return [float(line.split("loss ")[1].split()[0]) for line in out.splitlines()
            if line.startswith("step ") and " loss " in line]


def test_lejepa_trains_through_train_py_and_writes_its_health_plot(imagenette_small, tmp_path, capsys):
    train.main(["--config", str(REPO / "configs/lejepa/tiny_cpu.yaml"), *LEJEPA_TINY, f"data.root={imagenette_small}",
                f"trainer.output_dir={tmp_path}", "trainer.max_steps=16", "optim.warmup_steps=4"])
    out = capsys.readouterr().out
    losses = losses_of(out)
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
    assert "kNN accuracy (k=20): random init" in out
    png = tmp_path / "health.png"
    assert f"health plot: {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    scalars = read_scalars(tmp_path)
    for tag in ("train/prediction_loss", "train/sigreg", "collapse/embedding_rank", "collapse/projection_std"):
        assert len(scalars[tag][0]) == 16, tag
    assert len(scalars["monitor/knn"][0]) == 2
    online = load_file(str(tmp_path / "checkpoint-00000016" / "model.safetensors"))
    assert int(online["sigreg.draws"]) == 16 and any(k.startswith("backbone.blocks.") for k in online)
    # evaluation reads the method's own encoder (LeJEPA: the backbone) without --which
    cli_main(["eval", "knn", "--encoder", str(tmp_path), "--data", str(imagenette_small), "--out",
              str(tmp_path / "eval"), "features.num_workers=0", "features.batch_size=16"])
    assert "(checkpoint, backbone" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"knn"} and all(0 <= r["value"] <= 1 for r in records)


def checkpoint_state(ckpt):
    return {name: load_file(str(p)) for name in ("model", "target_encoder")
            if (p := ckpt / f"{name}.safetensors").is_file()}


RESUMED = [  # (name, arguments, SIGReg calls per step)
    ("lejepa", ["--config", str(REPO / "configs/lejepa/tiny_cpu.yaml"), *LEJEPA_TINY, "model.drop_path=0.1"], 1),
    ("ijepa_sigreg_online", [*IJEPA_TINY, "loss.sigreg_weight=0.05", "loss.target_source=online",
                             "loss.target_stop_grad=false", "loss.sigreg_on=both", "model.drop_path=0.1"], 2),
]


@pytest.mark.parametrize("name,args,calls", RESUMED, ids=[name for name, _, _ in RESUMED])
def test_resume_with_per_step_slices_is_exact(imagenette_small, tmp_path, name, args, calls):
    common = [*args, f"data.root={imagenette_small}", "optim.schedule_steps=4", "trainer.plot=false"]
    train.main(common + [f"trainer.output_dir={tmp_path / 'full'}", "trainer.max_steps=4"])
    train.main(common + [f"trainer.output_dir={tmp_path / 'split'}", "trainer.max_steps=2"])
    train.main(common + [f"trainer.output_dir={tmp_path / 'split'}", "trainer.max_steps=4"])
    full = checkpoint_state(tmp_path / "full" / "checkpoint-00000004")
    split = checkpoint_state(tmp_path / "split" / "checkpoint-00000004")
    assert full.keys() == split.keys() and int(split["model"]["sigreg.draws"]) == 4 * calls
    for part in full:
        for key in full[part]:
            assert torch.equal(full[part][key], split[part][key]), (part, key)
    # the logged curve of the resumed run is the uninterrupted one (replayed steps drawn once)
    assert read_scalars(tmp_path / "split")["train/sigreg"] == read_scalars(tmp_path / "full")["train/sigreg"]


@pytest.mark.parametrize("variant", [
    ["loss.sigreg_weight=0.05"],  # EMA targets, SIGReg on each image's pooled context embedding
    ["loss.sigreg_weight=0.05", "loss.target_source=online", "loss.sigreg_tokens=true"],  # no EMA, stop-grad
])
def test_ijepa_with_sigreg_trains_through_train_py(imagenette_small, tmp_path, capsys, variant):
    train.main([*IJEPA_TINY, *variant, f"data.root={imagenette_small}", f"trainer.output_dir={tmp_path}",
                "trainer.max_steps=12", "trainer.plot=false"])
    losses = losses_of(capsys.readouterr().out)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    scalars = read_scalars(tmp_path)
    assert len(scalars["train/sigreg"][0]) == 12 and "collapse/context_rank" in scalars


# ------------------------------------------------------------------------------------------------ configs
def test_shipped_configs_load_with_the_recipe_values():
    cfg = load_config(REPO / "configs/lejepa/vit_s8_imagenette.yaml")
    assert (cfg.method, cfg.model.encoder, cfg.model.patch_size, cfg.data.img_size) == ("lejepa", "vit_small", 8, 128)
    assert (cfg.sigreg.num_slices, cfg.sigreg.num_points, cfg.loss.sigreg_weight) == (256, 17, 0.02)
    assert (cfg.projector.out_dim, cfg.optim.lr, cfg.data.batch_size, cfg.data.global_views) == (16, 2e-3, 256, 4)
    assert cfg.augment.where == "device" and cfg.data.root == ".gpu_data/imagenette"
    cfg = load_config(REPO / "configs/ijepa/vit_s16_imagenette_sigreg.yaml")
    assert cfg.method == "ijepa" and cfg.loss.sigreg_weight > 0 and cfg.model.patch_size == 16
    assert load_config(REPO / "configs/lejepa/tiny_cpu.yaml").data.local_views == 2


@pytest.mark.parametrize("overrides,message", [
    (["method=lejepa", "data.global_views=1", "data.local_views=0"], "must give at least 2 views"),
    (["method=lejepa", "data.local_size=20", "model.patch_size=8"], "'data.local_size' (20) must be divisible"),
    (["method=lejepa", "loss.sigreg_weight=1.0"], "'loss.sigreg_weight' must be < 1"),
    (["loss.sigreg_on=target", "loss.sigreg_weight=0.1"], "'loss.sigreg_on' is 'target' but the targets do not"),
    (["loss.target_stop_grad=false"], "'loss.target_stop_grad' is false but loss.target_source is 'ema'"),
    (["sigreg.num_points=1"], "'sigreg.num_points' must be >= 2"),
])
def test_config_rules(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
