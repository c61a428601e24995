"""Export of our RoPE video ViT (``encoders.vit_video``, ``pos='rope'``) as a Hugging Face ``VJEPA2Model`` folder.

    info = to_vjepa2(encoder, "exports/vjepa_l16", frames=16, img_size=256)
    model = transformers.VJEPA2Model.from_pretrained("exports/vjepa_l16")
    model(video.transpose(1, 2)).last_hidden_state  == encoder(video)   # video (B, C, T, H, W); HF takes (B, T, C, H, W)

The folder holds ``config.json`` (``VJEPA2Config``: hidden size, depth, heads, ``mlp_ratio``, ``patch_size``,
``tubelet_size``, ``frames_per_clip`` = ``frames``, ``crop_size`` = ``img_size``, ``qkv_bias``, ``hidden_act='gelu'``,
``layer_norm_eps=1e-6``, ``drop_path_rate=0``) and ``model.safetensors``.

Name table (ours -> ``VJEPA2Model``): ``patch_embed.proj`` -> ``encoder.embeddings.patch_embeddings.proj`` (the
Conv3d, same (D, C, t, p, p) layout), ``norm`` -> ``encoder.layernorm``, and per block ``i`` -> ``encoder.layer.i``:
``norm1``/``norm2`` keep their names, ``attn.proj`` -> ``attention.proj``, ``mlp.fc1``/``mlp.fc2`` keep theirs; our
fused ``attn.qkv`` rows (q, k, v in that order) are ``attention.{query,key,value}``.

Predictor: ``VJEPA2Model`` always holds a predictor (``predictor.*``); ours is a different module and is not
exported. ``from_pretrained`` does not require its weights (missing ones are initialised at random, differently at
each load, with a MISSING report), so we write a placeholder, deterministic and small: ``pred_hidden_size=64``, one
head, one layer (override with ``predictor={...}`` of ``VJEPA2Config`` ``pred_*`` fields), initialised by
transformers' own rule for it (truncated normal std ``initializer_range`` = 0.02 for linears, zero biases, unit
LayerNorms, zero mask tokens) from seed ``seed`` (0). It predicts nothing meaningful: use
``model(x, skip_predictor=True)`` or ``model.get_vision_features(x)`` for features.

Architectural differences found (``transformers`` 5.x ``modeling_vjepa2.py``), and what they mean for parity:

- RoPE positions: ``VJEPA2Model`` recovers (t, h, w) from the flat token index with a *square* grid of
  ``crop_size / patch_size`` taken from the config, whatever the input size; ours (like the original V-JEPA 2 code
  with non-square handling) uses each input's actual grid. Outputs agree for square inputs of exactly
  ``img_size`` (any number of frames, time positions need no grid); at another H or W, ``VJEPA2Model``'s rows and
  columns are wrong and only ours is right. Export at the size you will run the HF model at.
- RoPE frequencies/pairing: identical (three blocks of ``2 * (head_dim // 6)`` channels for t, h, w, angles
  concatenated twice on interleaved pairs, the remaining channels unrotated; see ``encoders/vit_video.py``).
  ``VJEPA2Model`` computes the angles in the activation dtype (bf16/fp16 when loaded so); ours always in fp32.
- Kept tokens: ``VJEPA2Model``'s encoder always runs every token (its ``context_mask`` only selects outputs
  afterwards); our ``encoder(x, keep_idx)`` equals its layers run on the gathered tokens with
  ``position_mask=keep_idx`` (the path its predictor takes). It has no key-padding mask.
- Short clips: ``VJEPA2Model`` repeats a clip of fewer than ``tubelet_size`` frames ``tubelet_size`` times (T=1 ->
  ``tubelet_size`` frames, as ours; T=3 with tubelet 4 -> 12 frames); ours repeats only a single frame and rejects
  any other T that is not a multiple of the tubelet.
- Input layout: ``VJEPA2Model`` takes ``pixel_values_videos`` (B, T, C, H, W) and casts it to the weight dtype;
  ours takes (B, C, T, H, W).
- Same: pre-norm blocks, exact GELU, MLP width ``int(D * mlp_ratio)``, LayerNorm eps 1e-6, SDPA scale
  ``head_dim ** -0.5``, final LayerNorm on every token, no class token, stochastic depth linear in depth (0 at export).
- A ``pos='sincos'`` encoder cannot be exported: ``VJEPA2Model`` has no additive position table (its only positions
  are the RoPE rotations inside attention), so the sin-cos term our encoder adds after the tubelet embedding has no
  place to go. Export it as ``safetensors`` (or train with ``model.pos=rope``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from encoders.vit_video import VideoTransformer

from .hf_mapping import NameTable
from .reader import read_weights

VJEPA2 = NameTable(
    top=(("patch_embed.proj", "encoder.embeddings.patch_embeddings.proj"), ("norm", "encoder.layernorm")),
    block=(("norm1", "norm1"), ("attn.proj", "attention.proj"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
           ("mlp.fc2", "mlp.fc2")),
    qkv="attention.{part}",
)
PLACEHOLDER_PREDICTOR = dict(pred_hidden_size=64, pred_num_attention_heads=1, pred_num_hidden_layers=1,
                             pred_mlp_ratio=4.0, pred_num_mask_tokens=10, pred_zero_init_mask_tokens=True)


class VJEPA2ExportError(ValueError):
    """An encoder that ``VJEPA2Model`` cannot represent, a bad export size, or a folder that is not an export."""


def to_vjepa2_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our video ViT state dict -> ``VJEPA2Model`` encoder keys."""
    return VJEPA2.to_theirs(state, depth)


def from_vjepa2_state(hf: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The inverse of ``to_vjepa2_state``; ``predictor.*`` keys are dropped."""
    return VJEPA2.to_ours(hf, depth)


def vjepa2_config(encoder: VideoTransformer, frames: int, img_size: int, predictor: dict | None = None):
    """The ``VJEPA2Config`` of ``encoder`` exported for clips of ``frames`` x ``img_size`` x ``img_size``."""
    from transformers import VJEPA2Config

    block = encoder.blocks[0]
    config = VJEPA2Config(
        patch_size=encoder.patch_size, crop_size=img_size, frames_per_clip=frames, tubelet_size=encoder.tubelet_size,
        hidden_size=encoder.embed_dim, in_chans=encoder.in_chans, num_attention_heads=encoder.num_heads,
        num_hidden_layers=len(encoder.blocks), mlp_ratio=encoder.mlp_ratio, layer_norm_eps=1e-6,
        qkv_bias=block.attn.qkv.bias is not None, hidden_act="gelu", drop_path_rate=0.0,
        **{**PLACEHOLDER_PREDICTOR, **(predictor or {})})
    if int(config.hidden_size * config.mlp_ratio) != block.mlp.fc1.out_features:
        raise VJEPA2ExportError(f"VJEPA2Model's MLP width int({config.hidden_size} * {config.mlp_ratio}) differs "
                                f"from the encoder's {block.mlp.fc1.out_features}")
    config.architectures = ["VJEPA2Model"]
    return config


def placeholder_predictor_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """``predictor.*`` weights of a fresh ``VJEPA2Predictor`` initialised by transformers' rule from ``seed``
    (the global RNG is left as it was)."""
    from transformers.models.vjepa2.modeling_vjepa2 import VJEPA2Predictor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = VJEPA2Predictor(config)
        for module in predictor.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=config.initializer_range)
                nn.init.zeros_(module.bias)
        if not config.pred_zero_init_mask_tokens:
            nn.init.trunc_normal_(predictor.embeddings.mask_tokens, std=config.initializer_range)
    return {f"predictor.{k}": v.detach().contiguous() for k, v in predictor.state_dict().items()}


def _check_encoder(encoder: nn.Module, frames: int, img_size: int) -> VideoTransformer:
    if not isinstance(encoder, VideoTransformer):
        raise VJEPA2ExportError(f"VJEPA2Model export needs a video ViT (encoders.vit_video), got "
                                f"{type(encoder).__name__}")
    if encoder.pos != "rope":
        raise VJEPA2ExportError(
            f"VJEPA2Model export needs a pos='rope' video ViT, got pos='{encoder.pos}': VJEPA2Model has no additive "
            f"position table (its only positions are 3-D RoPE rotations inside attention), so the sin-cos table "
            f"this encoder adds after the tubelet embedding cannot be mapped; export it as safetensors instead")
    if frames <= 0 or frames % encoder.tubelet_size:
        raise VJEPA2ExportError(f"VJEPA2Model export: frames {frames} is not a positive multiple of the tubelet "
                                f"size {encoder.tubelet_size}")
    if img_size <= 0 or img_size % encoder.patch_size:
        raise VJEPA2ExportError(f"VJEPA2Model export: img_size {img_size} is not a positive multiple of the patch "
                                f"size {encoder.patch_size}")
    return encoder


def to_vjepa2(encoder: nn.Module, out_dir: str | Path, frames: int, img_size: int, predictor: dict | None = None,
              seed: int = 0, check: bool = True, atol: float = 1e-4) -> dict:
    """Write ``encoder`` (a ``pos='rope'`` video ViT) as a ``VJEPA2Model`` folder for clips of ``frames`` x
    ``img_size``^2. With ``check`` the folder is loaded back with ``from_pretrained`` and compared with the encoder
    on one seeded clip of ``min(frames, 2 * tubelet)`` frames (the HF model in fp32 on the CPU, the encoder where
    and as it is: an fp32 encoder is expected); a difference above ``atol`` is an error.
    Returns the facts for ``export.json``."""
    from transformers import VJEPA2Model

    video_encoder = _check_encoder(encoder, frames, img_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = vjepa2_config(video_encoder, frames, img_size, predictor)
    config.save_pretrained(str(out))
    state = {k: v.detach().cpu().float() for k, v in video_encoder.state_dict().items()}
    weights = {**to_vjepa2_state(state, len(video_encoder.blocks)), **placeholder_predictor_state(config, seed)}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    info = dict(architecture="VJEPA2Model", frames_per_clip=frames, crop_size=img_size,
                predictor=f"placeholder (not trained; transformers' init rule, seed {seed})", vjepa2_max_abs_diff=None)
    if check:
        clip = torch.randn(1, video_encoder.in_chans, min(frames, 2 * video_encoder.tubelet_size), img_size, img_size,
                           generator=torch.Generator().manual_seed(seed))
        model = VJEPA2Model.from_pretrained(str(out)).float().eval()
        weight = video_encoder.patch_embed.proj.weight
        was_training = video_encoder.training
        video_encoder.eval()
        with torch.no_grad():
            got = model(clip.transpose(1, 2), skip_predictor=True).last_hidden_state
            want = video_encoder(clip.to(weight.device, weight.dtype)).float().cpu()
        video_encoder.train(was_training)
        diff = float((got - want).abs().max())
        if diff > atol:
            raise VJEPA2ExportError(f"VJEPA2Model export '{out}' differs from the encoder by {diff:.2e} (> {atol})")
        info["vjepa2_max_abs_diff"] = diff
    return info


def from_vjepa2(folder: str | Path) -> dict[str, torch.Tensor]:
    """Our video ViT state dict (``pos='rope'``) from a ``VJEPA2Model`` folder (ours or a hub checkpoint in the
    same layout); the predictor is dropped. Build the encoder from its ``config.json`` sizes."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise VJEPA2ExportError(f"'{folder}' is not a VJEPA2Model folder (no config.json)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "vjepa2":
        raise VJEPA2ExportError(f"'{config_path}' has model_type {config.get('model_type')!r} (expected 'vjepa2')")
    return from_vjepa2_state(read_weights(folder / "model.safetensors"), int(config["num_hidden_layers"]))
