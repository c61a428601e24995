"""Several processes on CPU (gloo, forked: tests/distributed_worker.py): DDP gives the gradients and weights of one
process on the full batch, for every method; FSDP2 (the shipped configs/accelerate/fsdp.yaml) gives DDP's, with each
EMA teacher sharded like its online module; resume under FSDP is exact and its checkpoint reads and exports like
any other; hybrid sharding (2-D mesh) mirrors onto the teacher; the accelerate configs launch as documented."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker as dw
from conftest import REPO, TINY, make_subset
from jepa.config import ConfigError, load_config
from jepa.methods import get_method
from test_vjepa import clip_folder  # noqa: F401  (fixture)
from test_vljepa import flickr_small  # noqa: F401  (fixture)

ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
# momentum 0.5: the teachers move by half the online change each step, so a missed or misplaced EMA update shows
FIXED = ["optim.ema_start=0.5", "optim.ema_end=0.5", "monitor.knn_every=0", "data.num_workers=0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("images"), 8, 4)


def method_setup(name, images, clips, flickr):
    """(config file, overrides) of a tiny run of each method whose DDP loss is exactly the full-batch loss: no
    batch statistics (LeJEPA's projector with LayerNorm, not BatchNorm), no dropout (VL-JEPA's Y-encoder frozen),
    masks cut to the batch minimum (every row the same token counts, so per-rank means average to the global one)."""
    configs = REPO / "configs"
    return {
        "ijepa": (None, [*TINY, f"data.root={images}", "masks.equalize=truncate"]),
        "vjepa": (configs / "vjepa" / "tiny_cpu.yaml", [f"data.root={clips}", "data.batch_size=4",
                                                      "masks.equalize=truncate"]),
        "vljepa": (configs / "vljepa" / "tiny_cpu.yaml", [
            "vl.x_encoder=random:vit_tiny", "data.img_size=32", "data.batch_size=8", "predictor.dim=64",
            "predictor.num_heads=2", "predictor.depth=1", "data.max_target_len=24", f"data.root={flickr[0]}",
            f"data.split_file={flickr[1]}", "data.cache_tokens=false", "vl.y_lr_mult=0"]),
        "lejepa": (configs / "lejepa" / "tiny_cpu.yaml", [f"data.root={images}", "data.batch_size=8",
                                                        "projector.norm=layer"]),
    }[name]


def first_batch(config, overrides):
    """The method's first training batch, built by its real pipeline in this process (one process, full batch)."""
    from data.loaders import build_pretrain_loader

    cfg = load_config(config, overrides)
    spec = get_method(cfg.method)
    loader, _ = build_pretrain_loader(spec.pipeline, cfg, spec.build(cfg), 0, 1, pin_memory=False)
    return next(iter(loader))


def run_steps(tmp_path, name, world, env, config, overrides, batch, steps=2):
    folder = tmp_path / name
    folder.mkdir()
    dw.fork_ranks(dw.step_worker, world, str(folder / "init"), env, str(folder), config and str(config),
                  overrides, batch, steps)
    losses = [torch.load(folder / f"losses{rank}.pt") for rank in range(world)]
    return torch.load(folder / "result.pt"), [sum(step) / world for step in zip(*losses)]


def largest_change(before: dict, after: dict) -> float:
    return max(float((after[k].float() - before[k].float()).abs().max()) for k in after)


def assert_same_weights(result: dict, reference: dict, part: str, what: str) -> None:
    """Each tensor of ``part`` after the steps within 5% of how far the reference moved it (exact where it did
    not move). Not tighter: AdamW's normalised update turns last-bit differences of a near-zero gradient into
    visible ones (an element whose gradient is near eps moves by about lr x its gradient difference / eps); the
    gradients themselves are compared tightly. A missed, doubled or misplaced update is off by ~100%."""
    before, after, state = reference["before"][part], reference["after"][part], result["after"][part]
    assert state.keys() == after.keys() and after, f"{what}: {part}"
    for key, expected in after.items():
        change = float((expected.float() - before[key].float()).abs().max())
        error = float((state[key].float() - expected.float()).abs().max())
        assert error <= 0.05 * change + 1e-8, f"{what}: {part} '{key}' differs by {error:.3g} (moved {change:.3g})"


def assert_same_run(result, losses, reference, reference_losses, what):
    """Losses, every gradient the optimizer saw, and the weights after the steps (online, each teacher, the ones
    the monitors read) agree with the reference run."""
    ref = reference
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=1e-7)
    assert len(result["grads"]) == len(ref["grads"])
    for step, (grads, ref_grads) in enumerate(zip(result["grads"], ref["grads"])):
        assert grads.keys() == ref_grads.keys() and grads, f"{what}: step {step} gradients"
        for key, ref_grad in ref_grads.items():
            torch.testing.assert_close(grads[key], ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()),
                                       msg=lambda m: f"{what}: gradient of '{key}' at step {step}: {m}")
    assert largest_change(ref["before"]["online"], ref["after"]["online"]) > 0
    for part in ref["after"]:
        assert_same_weights(result, ref, part, what)


@pytest.mark.slow
@pytest.mark.parametrize("method, accum, extra", [
    pytest.param("ijepa", 1, [], id="ijepa"), pytest.param("vjepa", 1, [], id="vjepa"),
    pytest.param("vljepa", 1, [], id="vljepa"), pytest.param("lejepa", 1, [], id="lejepa"),
    pytest.param("ijepa", 2, ["model.checkpoint_blocks=2", "predictor.checkpoint_blocks=1"],  # recompute in units
                 id="ijepa-accum2-recompute"),
])
def test_ddp_and_fsdp_match_one_process_on_the_full_batch(method, accum, extra, images, clip_folder,  # noqa: F811
                                                          flickr_small, tmp_path):  # noqa: F811
    """One process on the whole batch vs 2 processes on half of it each (in ``accum`` micro-batches: DDP's
    ``no_sync``, FSDP2's deferred reduce-scatter)."""
    config, overrides = method_setup(method, images, clip_folder, flickr_small)
    overrides = [*overrides, *FIXED, *extra, f"trainer.output_dir={tmp_path / 'out'}"]
    batch = first_batch(config, overrides)
    reference, reference_losses = run_steps(tmp_path, "one", 1, {}, config, overrides, batch)
    overrides.append(f"trainer.grad_accum_steps={accum}")
    ddp, ddp_losses = run_steps(tmp_path, "ddp", 2, {}, config, overrides, batch)
    fsdp, fsdp_losses = run_steps(tmp_path, "fsdp", 2, dw.launch_env(), config, overrides, batch)
    assert_same_run(ddp, ddp_losses, reference, reference_losses, f"{method} DDP vs one process")
    assert_same_run(fsdp, fsdp_losses, ddp, ddp_losses, f"{method} FSDP vs DDP")
    for part in reference["after"]:  # the online model, every EMA teacher and the monitored encoder moved
        moved = largest_change(reference["before"][part], reference["after"][part]) > 0
        assert moved == (part in ("online", "monitor") or method in ("ijepa", "vjepa")), part
    # under FSDP each EMA teacher parameter has its online parameter's placements, and holds about half of it
    facts = fsdp["sharding"]
    assert bool(facts) == (method in ("ijepa", "vjepa"))  # the methods with an EMA teacher
    assert all(same for same, _, _ in facts.values()), facts
    assert all(local <= (numel + 1) // 2 for _, local, numel in facts.values()), facts
    assert not any(same for same, _, _ in ddp["sharding"].values())


def assert_equal_nested(a, b, where: str) -> None:
    """Nested dicts / sequences of tensors and numbers are identical (tensors bit for bit; a list and a tuple of
    the same items are equal: a resumed optimizer's betas come back as a list)."""
    sequence = (list, tuple)
    assert type(a) is type(b) or (isinstance(a, sequence) and isinstance(b, sequence)), where
    if isinstance(a, dict):
        assert a.keys() == b.keys() and a, where
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, sequence):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_its_checkpoint_reads_and_exports(images, tmp_path):
    from jepa.export import export_encoder, load_export
    from jepa.reader import load_checkpoint_encoder

    common = [*TINY, f"data.root={images}", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=5",
              "optim.schedule_steps=4", "model.drop_path=0.1", "monitor.knn_every=2", "data.batch_size=4"]
    full, split = tmp_path / "full", tmp_path / "split"
    runs = [[*common, f"trainer.output_dir={full}", "trainer.max_steps=4"],
            [*common, f"trainer.output_dir={split}", "trainer.max_steps=2"],
            [*common, f"trainer.output_dir={split}", "trainer.max_steps=4"]]
    dw.fork_ranks(dw.train_worker, 2, str(tmp_path / "init"), dw.launch_env(), runs)
    last = "checkpoint-00000004"
    names = sorted(p.name for p in (split / last).iterdir())
    assert "pytorch_model_fsdp.bin" in names and "model.safetensors" not in names, names
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors", "target_encoder.safetensors"} <= set(names)
    for file in ("pytorch_model_fsdp.bin", "optimizer.bin"):  # accelerate's gathered model and AdamW state
        assert_equal_nested(torch.load(full / last / file, weights_only=True),
                            torch.load(split / last / file, weights_only=True), file)
    teacher_full = load_file(str(full / last / "target_encoder.safetensors"))
    assert_equal_nested(teacher_full, load_file(str(split / last / "target_encoder.safetensors")), "teacher")
    state = [json.loads((folder / last / "train_state.json").read_text()) for folder in (full, split)]
    assert state[0]["monitors"] == state[1]["monitors"] and set(state[0]["monitors"]) == {"knn@0", "knn@2", "knn@4"}
    # the reader and export take the FSDP checkpoint: whole weights, the teacher's and the online context encoder's
    encoder, _, ckpt = load_checkpoint_encoder(split)
    assert ckpt.name == last and all(torch.equal(v, teacher_full[k]) for k, v in encoder.state_dict().items())
    context, _, _ = load_checkpoint_encoder(split, which="context")
    online = torch.load(split / last / "pytorch_model_fsdp.bin", weights_only=True)
    assert all(torch.equal(v, online[f"context_encoder.{k}"]) for k, v in context.state_dict().items())
    exported, _, _ = load_export(export_encoder(split, "safetensors", tmp_path / "export"))
    images_in = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(exported(images_in), encoder(images_in))
    # resuming it without FSDP names what it is
    with pytest.raises(Exception, match="written under FSDP"):
        dw.fork_ranks(dw.train_worker, 2, str(tmp_path / "init-ddp"), {},
                      [[*common, f"trainer.output_dir={split}", "trainer.max_steps=6"]])


@pytest.mark.slow
def test_hybrid_sharding_mirrors_onto_the_teacher_and_updates_it_shard_by_shard(tmp_path):
    from jepa.methods.ijepa import build_vision_encoder

    overrides = [*TINY, "trainer.output_dir=unused"]
    dw.fork_ranks(dw.mesh_worker, 4, str(tmp_path / "init"), str(tmp_path), overrides)
    out = torch.load(tmp_path / "mesh.pt")
    assert set(out["placements"].values()) == {(("Replicate", None), ("Shard", 0))}, out["placements"]
    assert out["resharded"]  # after its forward every teacher parameter is a shard again
    for key, start in out["start"].items():  # teacher <- lerp(teacher, online + delta, 0.75), chunk by chunk
        torch.testing.assert_close(out["after"][key], start + 0.75 * out["delta"][key], rtol=1e-6, atol=1e-6)
    whole = build_vision_encoder(load_config(None, overrides)).eval()
    whole.load_state_dict(out["after"])
    with torch.no_grad():
        torch.testing.assert_close(out["output"], whole(out["images"]), rtol=1e-5, atol=1e-5)
    assert "sharded in the online module but whole in the teacher" in out["whole_error"]


def test_fsdp_setups_the_trainer_cannot_run_name_their_key():
    from accelerate.utils import DistributedType

    from jepa.trainer import fsdp_plugin

    def accelerator(**plugin):
        return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(
            fsdp_plugin=SimpleNamespace(**{"fsdp_version": 2, "state_dict_type": "FULL_STATE_DICT", **plugin})))

    assert fsdp_plugin(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)) is None
    assert fsdp_plugin(accelerator()).fsdp_version == 2
    with pytest.raises(ConfigError, match="'fsdp_config.fsdp_version' is 1; expected 2"):
        fsdp_plugin(accelerator(fsdp_version=1))
    with pytest.raises(ConfigError, match="'fsdp_config.fsdp_state_dict_type' is SHARDED_STATE_DICT; expected FULL"):
        fsdp_plugin(accelerator(state_dict_type=SimpleNamespace(name="SHARDED_STATE_DICT")))


def test_every_block_class_becomes_an_fsdp_unit():
    from jepa.trainer import declare_fsdp_units

    cfg = load_config(None, [*TINY, "predictor.backbone=hybrid", "predictor.pattern=MA", "predictor.d_state=16",
                             "predictor.headdim=16"])
    model = get_method(cfg.method).build(cfg).model
    declare_fsdp_units(model)
    assert {"Block", "Mamba3Block"} <= set(model._no_split_modules), model._no_split_modules
    model._no_split_modules = ["Block"]  # a model's own declaration is kept
    declare_fsdp_units(model)
    assert model._no_split_modules == ["Block"]


def test_logit_scale_and_its_optimizer_state_load_from_0d_checkpoints():
    from jepa.losses import LogitScale
    from jepa.trainer import match_state_shapes

    scale = LogitScale(0.07)
    assert scale.log_scale.shape == (1,) and scale().shape == ()
    scale.load_state_dict({"log_scale": torch.tensor(2.0)})  # written when log_scale was 0-d
    assert scale.log_scale.tolist() == [2.0]
    optimizer = torch.optim.AdamW(scale.parameters())
    optimizer.state[scale.log_scale] = {"step": torch.tensor(3.0), "exp_avg": torch.tensor(0.1),
                                        "exp_avg_sq": torch.tensor(0.2)}
    match_state_shapes(optimizer)
    state = optimizer.state[scale.log_scale]
    assert state["exp_avg"].shape == (1,) and state["exp_avg_sq"].shape == (1,) and state["step"].shape == ()
    scale().backward()
    optimizer.step()  # runs with the reshaped state


@pytest.mark.parametrize("name, kind, processes", [("single_gpu", "single", 1), ("ddp", "multi_gpu", 2),
                                                   ("fsdp", "fsdp", 2), ("hsdp", "fsdp", 8),
                                                   ("multi_node", "multi_gpu", 16)])
def test_accelerate_configs_launch_as_the_readme_says(name, kind, processes):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    file = ACCELERATE_CONFIGS / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(file), "train.py"])
    _validate_launch_command(args)
    assert (args.multi_gpu, args.use_fsdp) == (kind == "multi_gpu", kind == "fsdp") and args.num_processes == processes
    assert f"configs/accelerate/{name}.yaml" in (REPO / "README.md").read_text()
    if kind == "fsdp":
        env = dw.launch_env(file)
        assert (env["FSDP_VERSION"], env["FSDP_STATE_DICT_TYPE"], env["FSDP_AUTO_WRAP_POLICY"]) == (
            "2", "FULL_STATE_DICT", "TRANSFORMER_BASED_WRAP")
        if name == "hsdp":
            sizes = int(env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"]) * int(env["PARALLELISM_CONFIG_DP_SHARD_SIZE"])
            assert sizes == processes
    if name == "multi_node":
        assert args.num_machines == 2 and args.main_process_ip and args.machine_rank == 0
