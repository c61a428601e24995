"""Pretrain a JEPA: ``accelerate launch train.py --config configs/quickstart.yaml key=value ...``.

Wires config -> method parts (jepa.methods) + data loaders (data/) + monitors (eval.monitor) -> jepa.trainer.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from data.loaders import build_pretrain_loader
from data.transforms import DeviceNormalize
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
                      device_transform=DeviceNormalize())
    state = trainer.fit()
    knn = {int(k.split("@")[1]): v for k, v in state.monitors.items() if k.startswith("knn@")}
    if accelerator.is_main_process and knn:
        first, last = min(knn), max(knn)
        print(f"kNN accuracy (k={cfg.monitor.knn_k}): random init {knn[first]:.4f} | after {last} steps "
              f"{knn[last]:.4f}", flush=True)
    return state.to_dict()


if __name__ == "__main__":
    main(sys.argv[1:])
