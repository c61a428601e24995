"""On-disk feature cache keyed by encoder weights + data + transform + feature mode.

A cache entry is ``<cache_dir>/<key[:2]>/<key>.safetensors`` (tensors ``features``, ``labels``; metadata: the
JSON description the key was hashed from). The key changes when any weight, the labelled source's
``fingerprint()`` (any file's path, size or mtime, a label, the class list; a clip source's clip length, frame
step, clips and crops per video), the transform, the resolution, the feature mode or the precision changes;
otherwise the entry is reused. Entries are written to a temporary name
and renamed, so a crash leaves no torn entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CACHE_VERSION = 2  # 2: images decoded by data.folder.load_rgb_uint8 and resized as tensors (1: PIL)


def default_cache_dir() -> Path:
    return Path(os.environ.get("OPENJEPA_CACHE", Path.home() / ".cache" / "openjepa" / "features"))


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(dict(description, version=CACHE_VERSION), sort_keys=True).encode()).hexdigest()


def entry_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / key[:2] / f"{key}.safetensors"


def load_entry(cache_dir: str | Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) of a cache entry, or None when there is none (or it is unreadable)."""
    path = entry_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor("features"), fh.get_tensor("labels")
    except Exception:  # a torn or foreign file is a miss, recomputed and overwritten
        return None


def save_entry(cache_dir: str | Path, key: str, features: torch.Tensor, labels: torch.Tensor,
               description: dict) -> Path:
    path = entry_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(tmp),
              metadata={"description": json.dumps(description, sort_keys=True)})
    os.replace(tmp, path)
    return path
