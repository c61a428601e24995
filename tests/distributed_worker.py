"""The per-rank halves of tests/test_distributed.py: DDP and FSDP over gloo in forked CPU processes.

Processes are forked from the test process (spawning costs ~10 s of imports each on 2 cores); each sets the
environment ``accelerate launch`` would give it, joins a gloo group through a file and resets accelerate's
process-wide state (a fork inherits the parent's). FSDP: the environment comes from the shipped
``configs/accelerate/fsdp.yaml`` through accelerate's own launcher code (``launch_env``). accelerate 1.15 takes FSDP
for accelerators only (on CPU its state stays ``MULTI_CPU``), so ``cpu_accelerator`` sets FSDP in that state with the
plugin the environment describes: accelerate's FSDP2 code (``prepare`` -> ``fully_shard``, ``clip_grad_norm_``,
``no_sync``, ``save_state`` / ``load_state`` with a full state dict) then runs as on GPUs, over gloo.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from jepa.config import load_config
from jepa.sharding import full_state_dict

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


LAUNCH_PREFIXES = ("FSDP_", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_PARALLELISM", "PARALLELISM_CONFIG_")


def launch_env(config_file: Path = FSDP_CONFIG) -> dict[str, str]:
    """The FSDP variables (``ACCELERATE_USE_FSDP``, ``FSDP_*``, the parallelism config's) that ``accelerate launch
    --config_file <file>`` sets for each process, computed by accelerate's launcher functions."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(LAUNCH_PREFIXES)}


def fork_ranks(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` forked processes; raises with the first failing rank's traceback."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world, *args), nprocs=world, start_method="fork")


def setup_rank(rank: int, world: int, init_file: str, env: dict[str, str]) -> None:
    """This process as accelerate's launcher would start it (CPU, one thread), in a gloo group when ``world`` > 1."""
    for key in DIST_ENV:
        os.environ.pop(key, None)
    os.environ.update(env, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    join_group(rank, world, init_file)


def join_group(rank: int, world: int, init_file: str) -> None:
    """A fresh gloo group (rendezvous through ``init_file``, which must be new) and fresh accelerate state."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    reset_accelerate()


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state (inherited through the fork, or left by the previous run)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def cpu_accelerator(cfg):
    """``jepa.trainer.make_accelerator(cfg)``; with ``ACCELERATE_USE_FSDP`` set, switched to FSDP (see the module
    docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from jepa.trainer import make_accelerator

    accelerator = make_accelerator(cfg)
    if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true" and accelerator.num_processes > 1:
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin()
    return accelerator


def split_rows(batch, rank: int, world: int):
    """This rank's equal share of every batched tensor's rows (0-d tensors, e.g. the skipped count, stay whole)."""
    from data.batch import map_tensors

    size = len(batch) // world
    rows = slice(rank * size, (rank + 1) * size)
    return map_tensors(batch, lambda t: t[rows] if t.dim() > 0 else t)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


def sharding_facts(trainer) -> dict:
    """Per EMA teacher parameter: (teacher placements == online placements, local numel, global numel)."""
    from torch.distributed.tensor import DTensor

    facts = {}
    for teacher, online in trainer.ema_pairs:
        for (name, t), (_, o) in zip(teacher.named_parameters(), online.named_parameters()):
            same = isinstance(t, DTensor) and isinstance(o, DTensor) and t.placements == o.placements
            local = t.to_local().numel() if isinstance(t, DTensor) else t.numel()
            facts[name] = (same, local, t.numel())
    return facts


def step_worker(rank: int, world: int, init_file: str, env: dict, out_dir: str, config_path: str | None,
                overrides: list, batch, steps: int) -> None:
    """``steps`` optimizer steps of the trainer on this rank's share of ``batch`` (the same batch each step, in
    ``trainer.grad_accum_steps`` equal micro-batches).
    Writes ``losses<rank>.pt`` and, from rank 0, ``result.pt``: the gradients the optimizer saw at each step, the
    online, teacher and monitored weights before and after (``weights``), and how each EMA teacher is sharded."""
    from data.loaders import pipeline_device_transform
    from jepa.methods import get_method
    from jepa.trainer import Trainer

    setup_rank(rank, world, init_file, env)
    try:
        cfg = load_config(config_path, overrides)
        torch.manual_seed(cfg.trainer.seed)
        spec = get_method(cfg.method)
        trainer = Trainer(cfg, spec.build(cfg), None, None, [], cpu_accelerator(cfg),
                          device_transform=pipeline_device_transform(spec.pipeline, cfg))
        main = rank == 0
        before = weights(trainer, main)
        grads = capture_gradients(trainer)
        share, accum = split_rows(batch, rank, world), cfg.trainer.grad_accum_steps
        micro_batches = [trainer.device_transform(split_rows(share, i, accum).to(trainer.device))
                         for i in range(accum)]
        losses = []
        trainer.model.train()
        for _ in range(steps):
            sums = {}
            trainer._train_step(iter(micro_batches), sums)
            losses.append(float(sums["loss"]))
        after = weights(trainer, main)
        torch.save(losses, f"{out_dir}/losses{rank}.pt")
        if main:
            torch.save({"grads": grads, "before": before, "after": after, "sharding": sharding_facts(trainer)},
                       f"{out_dir}/result.pt")
        if dist.is_initialized():  # the one-process reference runs without a group
            dist.barrier()  # no rank tears the group down while a peer still talks (see tests/gloo_group.py)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def weights(trainer, main: bool) -> dict:
    """{"online": full state, <teacher name>: full state, "monitor": the weights the monitors read (under FSDP
    their gathered copy)}, copies (collective under FSDP; filled on the main process)."""
    modules = {"online": trainer.method, **trainer.teachers}
    out = {name: {k: v.clone() for k, v in full_state_dict(module, keep=main).items()}
           for name, module in modules.items()}
    monitored = trainer._monitored_encoder()  # collective under FSDP; the main process gets the copy
    out["monitor"] = {k: v.clone() for k, v in full_state_dict(monitored, keep=True).items()} if main else {}
    return out


def capture_gradients(trainer) -> list[dict]:
    """A list that gets, at every optimizer step, {parameter name: its whole gradient} as the optimizer sees it
    (after the DDP all-reduce / FSDP reduce-scatter and the clip)."""
    names = {param: name for name, param in trainer.method.named_parameters()}
    grads = []

    def capture(optimizer, args, kwargs):  # collective under FSDP: every rank gathers in the same order
        grads.append({names[p]: _full(p.grad) for group in optimizer.param_groups for p in group["params"]
                      if p.grad is not None})

    trainer.optimizer.optimizer.register_step_pre_hook(capture)
    return grads


def train_worker(rank: int, world: int, init_file: str, env: dict, runs: list[list[str]]) -> None:
    """``train.main(argv)`` for each argv of ``runs`` in turn, each as a new ``accelerate launch`` would run it (a
    new process group: accelerate's ``end_training`` destroys the previous one)."""
    import train

    setup_rank(rank, world, f"{init_file}.0", env)
    try:
        train.make_accelerator = cpu_accelerator
        for i, argv in enumerate(runs):
            if i:
                join_group(rank, world, f"{init_file}.{i}")
            train.main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def mesh_worker(rank: int, world: int, init_file: str, out_dir: str, overrides: list) -> None:
    """Hybrid sharding without accelerate (which takes it for accelerators only): the encoder of ``overrides``
    sharded on a 2 x 2 (replicate x shard) CPU mesh, one FSDP unit per block; its EMA teacher ``shard_like`` it.
    Rank 0 writes the teacher's placements, its full weights before and after one EMA update on a known online
    change, and the output of its sharded forward on a fixed input; plus the error of an EMA into a whole teacher."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    from jepa.ema import ema_update
    from jepa.methods.ijepa import build_vision_encoder
    from jepa.sharding import shard_like

    setup_rank(rank, world, init_file, {})
    try:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        torch.manual_seed(0)
        online = build_vision_encoder(load_config(None, overrides))
        teacher, whole = copy.deepcopy(online).requires_grad_(False), copy.deepcopy(online)
        for block in online.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(online, mesh=mesh)
        shard_like(teacher, online)
        main = rank == 0
        start = full_state_dict(teacher, keep=main)
        delta = {}
        with torch.no_grad():
            for name, param in online.named_parameters():  # the same known change on every rank
                delta[name] = torch.randn(param.shape, generator=torch.Generator().manual_seed(len(delta)))
                param.add_(distribute_tensor(delta[name], param.device_mesh, param.placements, src_data_rank=None))
        ema_update(teacher, online, 0.25)
        after = full_state_dict(teacher, keep=main)
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            output = teacher(images)
        try:
            ema_update(whole, online, 0.5)
            whole_error = ""
        except ValueError as err:
            whole_error = str(err)
        if main:
            torch.save({"placements": {n: tuple((type(pl).__name__, getattr(pl, "dim", None)) for pl in p.placements)
                                       for n, p in teacher.named_parameters()},
                        "resharded": all(isinstance(p, DTensor) for p in teacher.parameters()),
                        "start": start, "after": after, "delta": delta, "images": images, "output": output,
                        "whole_error": whole_error}, f"{out_dir}/mesh.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
