"""Pretrain a JEPA: ``accelerate launch train.py --config configs/quickstart.yaml key=value ...``.

Wires config -> method parts (jepa.methods) + data loaders (data/) + monitors (eval.monitor) -> jepa.trainer.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from data.loaders import build_pretrain_loader, pipeline_device_transform
from eval.monitor import build_training_monitors
from jepa.config import load_config
from jepa.methods import get_method
from jepa.trainer import Trainer, make_accelerator


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment file (configs/...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=20")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def monitor_history(monitors: dict[str, float]) -> dict[str, dict[int, float]]:
    """{'knn@0': a, 'knn@100': b} -> {'knn': {0: a, 100: b}}."""
    out: dict[str, dict[int, float]] = {}
    for key, value in monitors.items():
        name, _, step = key.rpartition("@")
        out.setdefault(name, {})[int(step)] = value
    return out


def main(argv: list[str] | None = None) -> dict:
    config_path, overrides = parse_args(argv)
    cfg = load_config(config_path, overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(cfg.trainer.seed)
    accelerator = make_accelerator(cfg)
    spec = get_method(cfg.method)
    parts = spec.build(cfg)
    loader, batch_sampler = build_pretrain_loader(spec.pipeline, cfg, parts, accelerator.process_index,
                                                  accelerator.num_processes,
                                                  pin_memory=accelerator.device.type == "cuda")
    trainer = Trainer(cfg, parts, loader, batch_sampler, build_training_monitors(cfg), accelerator,
                      device_transform=pipeline_device_transform(spec.pipeline, cfg))
    state = trainer.fit()
    if accelerator.is_main_process:
        for name, by_step in monitor_history(state.monitors).items():
            first, last = min(by_step), max(by_step)
            label = f"kNN accuracy (k={cfg.monitor.knn_k})" if name == "knn" else f"monitor {name}"
            print(f"{label}: random init {by_step[first]:.4f} | after {last} steps {by_step[last]:.4f}", flush=True)
        if cfg.trainer.plot:
            from eval.health_plot import plot_health  # matplotlib only when a plot is asked for

            title = f"{cfg.method} {config_path or ''} ({state.step} steps)"
            try:
                print(f"health plot: {plot_health(cfg.trainer.output_dir, title=title)}", flush=True)
            except FileNotFoundError as err:  # no events (no tracker): the run itself succeeded
                logging.getLogger(__name__).warning("health plot skipped: %s", err)
    return state.to_dict()


if __name__ == "__main__":
    main(sys.argv[1:])
