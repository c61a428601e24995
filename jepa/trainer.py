"""The training loop: accelerate, gradient accumulation, EMA, schedules, checkpoints, logging, monitors.

The trainer receives everything it runs (the method's parts, loader, monitors); it builds none of it and names none
of the method's pieces: it calls ``model(batch, teachers) -> MethodOutput``, updates every EMA teacher from the online
submodule it follows, sums whatever logs the method returns, and saves every teacher by name.
A batch is any object with ``.to(device, non_blocking=...)``, ``len(batch)`` (samples) and ``.skipped`` (a 0-d
tensor): ``data.batch.Batch``. One optimizer step = ``trainer.grad_accum_steps`` micro-batches; schedules and the EMA update advance once per
optimizer step. Nothing in the step reads a tensor back to the host: logs accumulate on the device and are read
every ``trainer.log_every`` steps, where a non-finite loss also stops the run; whatever the log interval, a
checkpoint is never written from non-finite weights (``jepa.checkpoint.NonFiniteWeightsError``), so the last good
checkpoint stays intact. ``fit`` holds the output folder's run lock (``jepa.run_lock``) from start to end.
Under accelerate's FSDP2 (``configs/accelerate/fsdp.yaml``) each EMA teacher is sharded like the online submodule it
follows and updated shard by shard (``jepa.sharding``); the monitors read a whole copy gathered when they run.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import (CorruptCheckpointError, intact_alternative, latest_checkpoint, load_checkpoint,
                         recovery_hint, remove_stale_folders, save_checkpoint)
from .config import ConfigError, to_yaml
from .ema import ema_update
from .methods import MethodParts
from .monitors import CollapseMonitor
from .precision import resolve_precision
from .run_lock import run_lock
from .schedules import Cosine, Linear, WarmupCosine
from .sharding import full_state_dict, replicated_value, shard_like

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (this process)
    monitors: dict = field(default_factory=dict)  # e.g. {'knn@0': 0.30, 'knn@1000': 0.41}
    collapse_reference: dict = field(default_factory=dict)  # first feature std / rank values

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "monitors": self.monitors, "collapse_reference": self.collapse_reference}


def param_groups(model: nn.Module) -> list[dict]:
    """AdamW groups: weight decay on matrices/kernels; none on biases and 1-D parameters (norms, tokens).

    A method may declare ``lr_multipliers``: ``{submodule prefix: factor}`` (e.g. VL-JEPA's Y-encoder at 0.05x);
    each parameter takes the factor of its longest matching prefix (1 otherwise) as its group's ``lr_mult``.
    """
    multipliers = dict(getattr(model, "lr_multipliers", {}) or {})
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias"))
        matches = [prefix for prefix in multipliers if name == prefix or name.startswith(prefix + ".")]
        mult = float(multipliers[max(matches, key=len)]) if matches else 1.0
        groups.setdefault((decay, mult), []).append(param)
    out = []
    for decay in (True, False):  # decay groups first, as before multipliers existed (optimizer state order)
        for (group_decay, mult), params in groups.items():
            if group_decay == decay:
                group = {"params": params, "apply_wd": decay, "lr_mult": mult}
                out.append(group if decay else {**group, "weight_decay": 0.0})
    return out


def match_state_shapes(optimizer) -> None:
    """Optimizer state saved for a parameter whose shape changed since but not its size takes the parameter's shape
    (VL-JEPA's ``logit_scale.log_scale``: 0-d in older checkpoints, (1,) now); the step counts stay 0-d."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value) and value.shape != param.shape \
                        and value.numel() == param.numel():
                    state[key] = value.reshape(param.shape)


def build_schedules(cfg) -> dict:
    o, total = cfg.optim, cfg.optim.schedule_steps or cfg.trainer.max_steps
    return {
        "lr": WarmupCosine(o.start_lr, o.lr, o.final_lr, o.warmup_steps, total),
        "wd": Cosine(o.weight_decay, o.final_weight_decay, total),
        "momentum": Linear(o.ema_start, o.ema_end, total),
    }


COMPILE_RECOMPILE_LIMIT = 64


def compile_blocks(module: nn.Module) -> None:
    """Regional compilation: compile each transformer block in place (one graph reused by every block of the
    same shape), with dynamic sequence length since context lengths vary from batch to batch.

    Every block shares one code object, so its graphs are told apart by guards: grad mode (teacher vs student),
    width (encoder vs predictor), attention mask or none. Those are more than dynamo's default cache of 8 graphs per
    code object, past which it silently falls back to eager for the rest of the run; the limit is raised."""
    import torch._dynamo
    from timm.models.vision_transformer import Block

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), COMPILE_RECOMPILE_LIMIT))
    for sub in module.modules():
        if isinstance(sub, Block):
            sub.compile(dynamic=True)


def check_output_dir(output_dir: str) -> None:
    """``trainer.output_dir`` must be a folder or not exist yet (checked before anything is built or written)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"config key 'trainer.output_dir' is '{output_dir}', which is a file; expected a folder "
                          f"(existing or to be created)")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"config key 'trainer.output_dir' is '{output_dir}', but '{parent}' is a file")


def fsdp_plugin(accelerator):
    """accelerate's FSDP plugin when the run is FSDP-sharded (``accelerate launch --config_file
    configs/accelerate/fsdp*.yaml``), else None. ConfigError for what this trainer does not support: FSDP1 (its flat
    parameters cannot be mirrored onto the EMA teachers) and a sharded state dict (``torch.distributed.checkpoint``
    unpickles its metadata on load, while checkpoints here load without pickle code execution)."""
    from accelerate.utils import DistributedType

    if getattr(accelerator, "distributed_type", None) != DistributedType.FSDP:
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            logger.warning("the accelerate config asks for FSDP but accelerate runs %s (it takes FSDP on GPUs "
                           "only): the model is not sharded", getattr(accelerator, "distributed_type", None))
        return None
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ConfigError(f"accelerate config 'fsdp_config.fsdp_version' is {plugin.fsdp_version}; expected 2 "
                          f"(FSDP2 fully_shard: each EMA teacher is sharded like the online module it follows)")
    state_dict_type = getattr(plugin.state_dict_type, "name", plugin.state_dict_type)
    if state_dict_type != "FULL_STATE_DICT":
        raise ConfigError(f"accelerate config 'fsdp_config.fsdp_state_dict_type' is {state_dict_type}; expected "
                          f"FULL_STATE_DICT (a sharded state dict is read back by unpickling its metadata; "
                          f"checkpoints here load without pickle code execution)")
    return plugin


def declare_fsdp_units(model: nn.Module) -> None:
    """Name the FSDP units for accelerate's ``TRANSFORMER_BASED_WRAP`` policy when the accelerate config lists no
    ``fsdp_transformer_layer_cls_to_wrap``: the class of every element of an ``nn.ModuleList`` (the encoders' and
    predictors' blocks, whatever their class: ViT ``Block``, ``Mamba3Block``, a text encoder's layers), set as the
    model's ``_no_split_modules`` (which accelerate reads) unless the model declares its own."""
    if getattr(model, "_no_split_modules", None):
        return
    containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
    names = {type(child).__name__ for module in model.modules() if isinstance(module, nn.ModuleList)
             for child in module if not isinstance(child, containers)}
    model._no_split_modules = sorted(names)


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_output_dir(cfg.trainer.output_dir)
    precision = resolve_precision(cfg.trainer.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    return Accelerator(
        mixed_precision={"bf16": "bf16", "fp32": "no"}[precision],
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=cfg.trainer.output_dir, logging_dir=cfg.trainer.output_dir),
    )


class Trainer:
    """fit() trains ``parts.model`` (wrapped by accelerate) beside its teachers (never wrapped)."""

    def __init__(self, cfg, parts: MethodParts, loader, batch_sampler, monitors: list | None = None,
                 accelerator=None, device_transform=None):
        """``device_transform``: batch -> batch, applied after the copy to the device (e.g. uint8 -> normalised
        float images)."""
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        self.device = self.accelerator.device
        self.loader, self.batch_sampler = loader, batch_sampler
        self.monitors = monitors or []
        self.device_transform = device_transform or (lambda batch: batch)
        self.schedules = build_schedules(cfg)
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(param_groups(parts.model), lr=cfg.optim.start_lr, betas=cfg.optim.betas,
                                      weight_decay=cfg.optim.weight_decay, fused=fused)
        self.fsdp = fsdp_plugin(self.accelerator)
        # FSDP: the monitors read a whole copy (host memory), refreshed from the shards when they run
        self.monitor_copy = (copy.deepcopy(parts.monitor_encoder).cpu()
                             if self.fsdp is not None and parts.monitor_encoder is not None else None)
        if self.fsdp is not None:
            declare_fsdp_units(parts.model)
        if cfg.trainer.compile:
            for module in [parts.model] + [t.module for t in parts.teachers.values()]:
                compile_blocks(module)
        self.model, self.optimizer = self.accelerator.prepare(parts.model, optimizer)
        self.method = self.accelerator.unwrap_model(self.model)
        self.teachers = {name: t.module.to(self.device).requires_grad_(False) for name, t in parts.teachers.items()}
        self.ema_pairs = [(self.teachers[name], self.method.get_submodule(t.follows))
                          for name, t in parts.teachers.items() if t.follows is not None]
        if self.fsdp is not None:  # each EMA teacher sharded as the online module it follows, with its policies
            for teacher, online in self.ema_pairs:
                shard_like(teacher, online, self.fsdp.mixed_precision_policy, self.fsdp.cpu_offload)
        self.monitor_encoder = parts.monitor_encoder  # under FSDP its (sharded) source of monitor_copy, left in place
        if self.monitor_encoder is not None and self.fsdp is None:
            self.monitor_encoder = self.monitor_encoder.to(self.device)
        self.state = TrainState()
        self.collapse = CollapseMonitor()
        self.last_features: dict[str, torch.Tensor] = {}
        self.data_wait = 0.0  # seconds blocked on the loader in the current log window
        self.output_dir = Path(cfg.trainer.output_dir)

    # ---------------------------------------------------------------- setup / resume
    def resume(self) -> None:
        ckpt = latest_checkpoint(self.output_dir)
        if ckpt is None:
            self._print(f"starting from scratch in {self.output_dir}")
            return
        try:
            saved = load_checkpoint(self.accelerator, ckpt, self.teachers, self.cfg, schedule_names=self.schedules)
        except CorruptCheckpointError as err:  # never fall back silently: name the corrupt one and the way out
            raise CorruptCheckpointError(f"{err}\n{intact_alternative(ckpt)}") from err
        self.state = TrainState(step=saved["step"], epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"],
                                monitors=saved.get("monitors", {}),
                                collapse_reference=saved.get("collapse_reference", {}))
        match_state_shapes(self.optimizer)
        self.collapse.load_state_dict(self.state.collapse_reference)
        for name, schedule in self.schedules.items():
            schedule.load_state_dict(saved["schedules"][name])
        self._print(f"resumed from {ckpt} at step {self.state.step}")

    def _train_state(self) -> dict:
        out = self.state.to_dict()
        out["schedules"] = {name: s.state_dict() for name, s in self.schedules.items()}
        return out

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    # ---------------------------------------------------------------- data
    def _batches(self):
        """Endless micro-batches from the current data position, advancing epochs."""
        steps_per_epoch = len(self.batch_sampler)
        while True:
            if self.state.batch_in_epoch >= steps_per_epoch:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
            self.batch_sampler.set_position(self.state.epoch, self.state.batch_in_epoch)
            for batch in self.loader:
                self.state.batch_in_epoch += 1
                yield self.device_transform(batch.to(self.device, non_blocking=True))

    # ---------------------------------------------------------------- one optimizer step
    def _train_step(self, batches, sums: dict) -> int:
        """One optimizer step; adds its logs to ``sums``; returns the number of samples it trained on."""
        accum = self.cfg.trainer.grad_accum_steps
        lr, wd = self.schedules["lr"].value(), self.schedules["wd"].value()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            if group.get("apply_wd", False):
                group["weight_decay"] = wd
        samples = 0
        for micro in range(accum):
            waited = time.perf_counter()
            batch = next(batches)
            self.data_wait += time.perf_counter() - waited
            sync = micro == accum - 1
            with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                out = self.model(batch, self.teachers)
                self.accelerator.backward(out.loss / accum)
            self.last_features = out.features
            for key, value in {"loss": out.loss, **out.logs}.items():
                sums[key] = sums.get(key, 0.0) + value.detach() / accum
            sums["skipped"] = sums.get("skipped", 0) + batch.skipped
            samples += len(batch)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = replicated_value(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for teacher, online in self.ema_pairs:
            ema_update(teacher, online, self.schedules["momentum"].value())
        for schedule in self.schedules.values():
            schedule.step()
        self.state.step += 1
        return samples

    # ---------------------------------------------------------------- logging / monitors / checkpoints
    def _log(self, sums: dict, steps: int, samples: int, seconds: float) -> dict:
        """``samples``: this process's samples in the window (the global rate assumes equal shards)."""
        logs = {f"train/{k}": (v / steps if k != "skipped" else v) for k, v in sums.items()}
        logs = {k: float(v) for k, v in logs.items()}  # the one host sync, every log_every steps
        if not math.isfinite(logs["train/loss"]):
            raise NonFiniteLossError(
                f"loss became {logs['train/loss']} before step {self.state.step}; the run stops here and no "
                f"checkpoint is written or deleted. {recovery_hint(self.output_dir)}"
            )
        logs.update({
            "train/lr": self.schedules["lr"].at(self.state.step - 1),
            "train/wd": self.schedules["wd"].at(self.state.step - 1),
            "train/momentum": self.schedules["momentum"].at(self.state.step - 1),
            "train/samples_per_s": samples * self.accelerator.num_processes / max(seconds, 1e-9),
            "train/epoch": self.state.epoch,
            # host time blocked on the loader: with the GPU queue drained meanwhile, the share of the step lost to data
            "train/data_wait_frac": self.data_wait / max(seconds, 1e-9),
        })
        if self.last_features:
            stats, warnings = self.collapse.update(self.last_features)
            self.state.collapse_reference = self.collapse.state_dict()
            logs.update(stats)
            for warning in warnings:
                logger.warning("step %d: collapse monitor: %s", self.state.step, warning)
        if self.device.type == "cuda":
            logs["train/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.accelerator.log(logs, step=self.state.step)
        return logs

    def run_monitors(self) -> dict:
        """Run every monitor on the method's monitor encoder; the process RNG is restored afterwards so that monitoring
        (whose loaders draw worker seeds) never changes the training run."""
        results = {}
        devices = [self.device] if self.device.type == "cuda" else []
        encoder = self._monitored_encoder()
        if self.accelerator.is_main_process:
            for monitor in self.monitors:
                with torch.random.fork_rng(devices=devices):
                    value = monitor(encoder, self.device, self.accelerator.autocast)
                results[f"{monitor.name}@{self.state.step}"] = value
                self.accelerator.log({f"monitor/{monitor.name}": value}, step=self.state.step)
                self._print(f"step {self.state.step}: {monitor.name} = {value:.4f}")
        if self.monitor_copy is not None:
            self.monitor_copy.cpu()  # the device copy lives only while the monitors run
        self.accelerator.wait_for_everyone()
        self.state.monitors.update(results)
        return results

    def _monitored_encoder(self) -> nn.Module | None:
        """The monitor encoder itself, or under FSDP its whole copy on the main process's device, refreshed from the
        shards (collective: every process gathers, the main one keeps; None elsewhere). The monitors then run on the
        main process alone, as without FSDP; the copy costs one unsharded monitor encoder in host memory, and on the
        main process's device while the monitors run."""
        if self.monitor_copy is None:
            return self.monitor_encoder
        main = self.accelerator.is_main_process
        state = full_state_dict(self.monitor_encoder, keep=main)
        if not main:
            return None
        self.monitor_copy.load_state_dict(state, strict=True)
        return self.monitor_copy.to(self.device)

    def save(self) -> Path:
        return save_checkpoint(self.accelerator, self.output_dir, self.state.step, self.teachers,
                               self._train_state(), self.cfg, keep=self.cfg.trainer.keep_checkpoints,
                               model=self.method)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> TrainState:
        """Train to ``trainer.max_steps`` (resuming from the newest checkpoint) under the output folder's run lock,
        released on any exit; RunLockError when another run holds it."""
        with run_lock(self.output_dir, self.accelerator):
            self._remove_stale_folders()
            return self._fit()

    def _remove_stale_folders(self) -> None:
        """Leftovers of a crashed run (``.tmp-``/``.del-checkpoint-*``): removed by the main process, lock held."""
        if self.accelerator.is_main_process:
            remove_stale_folders(self.output_dir)
        self.accelerator.wait_for_everyone()

    def _fit(self) -> TrainState:
        cfg = self.cfg.trainer
        self.accelerator.init_trackers("openjepa")
        self._print("resolved config:\n" + to_yaml(self.cfg))
        trainable = sum(p.numel() for p in self.method.parameters() if p.requires_grad)
        self._print(f"trainable parameters: {trainable:,}")
        self.resume()
        if self.state.step == 0 and self.monitors:
            self.run_monitors()  # random init: the baseline every result is compared with
        batches = self._batches()
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not (cfg.progress_bar and
                   self.accelerator.is_main_process), desc="train", dynamic_ncols=True)
        sums, window_steps, window_samples, window_start = {}, 0, 0, time.perf_counter()
        self.model.train()
        while self.state.step < cfg.max_steps:
            window_samples += self._train_step(batches, sums)
            window_steps += 1
            bar.update(1)
            last = self.state.step == cfg.max_steps
            checkpoint_due = cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0
            if self.state.step % cfg.log_every == 0 or last or checkpoint_due:
                logs = self._log(sums, window_steps, window_samples, time.perf_counter() - window_start)
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", samples_s=f"{logs['train/samples_per_s']:.0f}")
                if not cfg.progress_bar:
                    memory = f"  peak {logs['train/peak_mem_gib']:.2f} GiB" if "train/peak_mem_gib" in logs else ""
                    self._print(f"step {self.state.step}: loss {logs['train/loss']:.4f}  lr {logs['train/lr']:.2e}  "
                                f"samples/s {logs['train/samples_per_s']:.0f}  data wait "
                                f"{100 * logs['train/data_wait_frac']:.0f}%{memory}")
                sums, window_steps, window_samples, window_start = {}, 0, 0, time.perf_counter()
                self.data_wait = 0.0
            monitor_due = self.cfg.monitor.knn_every and self.state.step % self.cfg.monitor.knn_every == 0
            if self.monitors and (monitor_due or last):
                self.run_monitors()
            if checkpoint_due or last:
                self.save()
        bar.close()
        self.accelerator.end_training()
        return self.state
