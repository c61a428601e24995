"""Encoder-only export of a training checkpoint: timm hub folder, Hugging Face ``IJepaModel`` folder, plain
safetensors, ONNX, or (video ViTs with 3-D RoPE) a ``VJEPA2Model`` folder; and the inverse (``load_export``) so that evaluation can start from any export.

    jepa export --ckpt outputs/run --to timm --out exports/vit_s16

``--out`` must be a new or empty folder (``--overwrite``: a non-empty one, whose whole content is replaced); never
a checkpoint folder, a folder inside one, a training output folder, or a folder holding the source checkpoint. Every
format is written into a temporary sibling folder and moved into place when complete.

Every export folder holds ``config.yaml`` (the training config the encoder was built from) and ``export.json``
(``format``, ``encoder``, ``img_size``, ``source`` checkpoint, ``which`` encoder, parity numbers), beside:

- ``safetensors``: ``encoder.safetensors`` — our encoder's own keys (``patch_embed.proj.*``, ``blocks.i.*``,
  ``norm.*`` for a ViT; ``backbone.*``, ``norm.*`` for a CNN), prefixes such as ``context_encoder.`` stripped.
- ``timm``: timm's hub layout, ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg`` with the true
  ``input_size``/``mean``/``std``) and ``model.safetensors``. Load it with
  ``timm.create_model('local-dir:<folder>', pretrained=True)`` or, on the architecture name,
  ``timm.create_model(cfg['architecture'], pretrained=True, num_classes=0, **cfg['model_args'],
  pretrained_cfg_overlay=dict(file='<folder>/model.safetensors', custom_load=False))`` (``custom_load=False``:
  some default tags of timm's ViT names load JAX ``.npz`` files otherwise). ``pretrained=True`` is needed in
  both forms: without it timm builds the architecture at random init.

  ViT mapping (ours -> timm ``VisionTransformer``): every parameter keeps its name (our ViT is built from timm's
  ``Block`` with timm's names); timm's ``pos_embed`` (1, N, D) is *added* and holds our fixed 2-D sin-cos table
  ``sincos_table(D, (S/p, S/p))`` for the export size S (first D/2 channels: row, last D/2: column) — fixed in our
  encoder, a (learnable) parameter in timm. ``model_args``: ``class_token=False``, ``no_embed_class=True``,
  ``reg_tokens=0``, ``global_pool='avg'``, ``fc_norm=False`` (so timm's final ``norm`` is applied to every token
  before pooling, as ours), ``dynamic_img_size=False``, ``qkv_bias``, ``mlp_ratio``, LayerNorm eps 1e-6 (timm's
  default). Then ``timm_model.forward_features(x)`` (B, N, D) equals ``encoder(x)`` and
  ``timm_model(x)`` (B, D) equals ``encoder(x).mean(1)``.

  CNN mapping: ``backbone.<name>`` -> ``<name>`` of ``timm.create_model(<timm name>, num_classes=0)``; our
  encoder's token LayerNorm (applied to the flattened feature map) has no timm counterpart and is written to
  ``token_norm.safetensors`` (``weight``, ``bias``; eps 1e-6): ``encoder(x) ==
  layer_norm(timm_model.forward_features(x).flatten(2).transpose(1, 2), weight, bias, eps=1e-6)``.
- ``hf`` (ViT only): ``config.json`` (``IJepaConfig``: ``layer_norm_eps=1e-6``, ``hidden_act='gelu'``,
  ``image_size`` = S) and ``model.safetensors`` in the hub checkpoint naming that every transformers version
  reads (the name table: ``jepa/hf_mapping.py``; ``embeddings.position_embeddings`` = the sin-cos table).
  ``IJepaModel.from_pretrained(folder)(pixel_values).last_hidden_state`` equals ``encoder(x)``.
- ``vjepa2`` (video ViT, ``model.pos=rope``): a ``transformers.VJEPA2Model`` folder (``jepa/export_vjepa2.py``:
  the name table, a placeholder predictor, the architectural differences); checked with ``from_pretrained``.
- ``onnx``: ``encoder.onnx``, input ``images`` (B, 3, S, S) (clips (B, 3, T, S, S) for video encoders) -> output ``tokens`` (B, N, D), dynamic batch axis;
  checked against the PyTorch encoder with onnxruntime when it is installed.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from encoders.cnn import CNNEncoder
from encoders.pos_embed import sincos_table
from encoders.vit import VisionTransformer

from .checkpoint import checkpoint_dirs, is_checkpoint_dir
from .config import load_config, to_yaml
from .hf_mapping import from_hf, to_hf
from .methods import get_method
from .reader import EncoderReadError, load_checkpoint_encoder, load_strict, read_weights

FORMATS = ("timm", "hf", "safetensors", "onnx", "vjepa2")
# eval transform statistics (data.transforms; jepa/ does not import data/)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExportError(EncoderReadError):
    """An export folder is missing or incomplete, or an encoder cannot be written in the asked format."""


# ------------------------------------------------------------------------------------------------ mappings
def _vit_check(encoder: nn.Module, fmt: str) -> VisionTransformer:
    if not isinstance(encoder, VisionTransformer):
        raise ExportError(f"--to {fmt} needs a ViT encoder, got {type(encoder).__name__} (CNN encoders export to "
                          f"timm, safetensors or onnx)")
    return encoder


def pos_table(encoder: VisionTransformer, img_size: int) -> torch.Tensor:
    """(1, (S/p)^2, D) fixed sin-cos table of our ViT at export size S."""
    grid = img_size // encoder.patch_size
    return sincos_table(encoder.embed_dim, (grid, grid)).unsqueeze(0).clone()


def timm_arch(encoder: VisionTransformer, size_name: str, img_size: int) -> str:
    """A registered timm ViT name of the same family (model_args override its sizes anyway)."""
    import timm

    size = size_name.removeprefix("vit_")
    for name in (f"vit_{size}_patch{encoder.patch_size}_{img_size}", f"vit_{size}_patch{encoder.patch_size}_224",
                 f"vit_{size}_patch16_224", f"vit_{size}_patch14_224"):
        if timm.is_model(name):
            return name
    return "vit_base_patch16_224"


def timm_vit_model_args(encoder: VisionTransformer, img_size: int) -> dict:
    block = encoder.blocks[0]
    return dict(img_size=img_size, patch_size=encoder.patch_size, embed_dim=encoder.embed_dim,
                depth=len(encoder.blocks), num_heads=encoder.num_heads, mlp_ratio=encoder.mlp_ratio,
                qkv_bias=block.attn.qkv.bias is not None, class_token=False, no_embed_class=True, reg_tokens=0,
                global_pool="avg", fc_norm=False, dynamic_img_size=False)


def to_timm_vit_state(encoder: VisionTransformer, img_size: int) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().float().contiguous() for k, v in encoder.state_dict().items()}
    state["pos_embed"] = pos_table(encoder, img_size)
    return state


def to_hf_state(encoder: VisionTransformer, img_size: int) -> dict[str, torch.Tensor]:
    """Our ViT state -> IJepaModel hub-checkpoint keys (``jepa/hf_mapping.py``)."""
    src = {k: v.detach().cpu().float() for k, v in encoder.state_dict().items()}
    return to_hf(src, len(encoder.blocks), pos_table(encoder, img_size))


# ------------------------------------------------------------------------------------------------- writers
def _pretrained_cfg(img_size: int, first_conv: str, classifier: str, fixed_input_size: bool) -> dict:
    """timm ``pretrained_cfg``; ``fixed_input_size`` makes timm pass ``img_size`` to the model (ViT only)."""
    return dict(input_size=[3, img_size, img_size], fixed_input_size=fixed_input_size, mean=list(IMAGENET_MEAN),
                std=list(IMAGENET_STD), interpolation="bicubic", crop_pct=1.0, crop_mode="center", num_classes=0,
                first_conv=first_conv, classifier=classifier, custom_load=False, license="apache-2.0")


def write_timm(encoder: nn.Module, cfg, img_size: int, out: Path) -> dict:
    if isinstance(encoder, CNNEncoder):
        state = {k.removeprefix("backbone."): v.detach().cpu().float().contiguous()
                 for k, v in encoder.state_dict().items() if k.startswith("backbone.")}
        pretrained = encoder.backbone.pretrained_cfg if hasattr(encoder.backbone, "pretrained_cfg") else {}
        config = dict(architecture=encoder.timm_name, num_classes=0, num_features=encoder.embed_dim,
                      model_args={}, pretrained_cfg=_pretrained_cfg(img_size, pretrained.get("first_conv", "conv1"),
                                                                    pretrained.get("classifier", "fc"), False))
        save_file({"weight": encoder.norm.weight.detach().cpu().float().contiguous(),
                   "bias": encoder.norm.bias.detach().cpu().float().contiguous()},
                  str(out / "token_norm.safetensors"))
    else:
        vit_encoder = _vit_check(encoder, "timm")
        state = to_timm_vit_state(vit_encoder, img_size)
        config = dict(architecture=timm_arch(vit_encoder, cfg.model.encoder, img_size), num_classes=0,
                      num_features=vit_encoder.embed_dim, global_pool="avg",
                      model_args=timm_vit_model_args(vit_encoder, img_size),
                      pretrained_cfg=_pretrained_cfg(img_size, "patch_embed.proj", "head", True))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"architecture": config["architecture"]}


def write_hf(encoder: nn.Module, cfg, img_size: int, out: Path) -> dict:
    from transformers import IJepaConfig

    vit_encoder = _vit_check(encoder, "hf")
    block = vit_encoder.blocks[0]
    hf_config = IJepaConfig(hidden_size=vit_encoder.embed_dim, num_hidden_layers=len(vit_encoder.blocks),
                            num_attention_heads=vit_encoder.num_heads, intermediate_size=block.mlp.fc1.out_features,
                            hidden_act="gelu", layer_norm_eps=1e-6, image_size=img_size,
                            patch_size=vit_encoder.patch_size, qkv_bias=block.attn.qkv.bias is not None)
    hf_config.architectures = ["IJepaModel"]
    hf_config.save_pretrained(str(out))
    save_file(to_hf_state(vit_encoder, img_size), str(out / "model.safetensors"), metadata={"format": "pt"})
    return {}


def write_safetensors(encoder: nn.Module, cfg, img_size: int, out: Path) -> dict:
    state = {k: v.detach().cpu().float().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(out / "encoder.safetensors"), metadata={"format": "pt"})
    return {}


class _TokensOnly(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


def example_input(cfg, img_size: int, batch: int, seed: int) -> torch.Tensor:
    """A seeded input of the encoder's kind: images (B, 3, S, S), or clips (B, 3, T, S, S) for video methods."""
    frames = getattr(cfg.data, "frames_per_clip", None)
    shape = (batch, 3, img_size, img_size) if frames is None else (batch, 3, frames, img_size, img_size)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_vjepa2(encoder: nn.Module, cfg, img_size: int, out: Path) -> dict:
    from .export_vjepa2 import to_vjepa2

    return to_vjepa2(encoder, out, cfg.data.frames_per_clip, img_size)


def write_onnx(encoder: nn.Module, cfg, img_size: int, out: Path) -> dict:
    path = out / "encoder.onnx"
    example = example_input(cfg, img_size, 2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks on constant sizes
        torch.onnx.export(_TokensOnly(encoder).eval(), (example,), str(path), input_names=["images"],
                          output_names=["tokens"], dynamic_axes={"images": {0: "batch"}, "tokens": {0: "batch"}},
                          opset_version=17, dynamo=False)
    info = {"onnx_max_abs_diff": None}
    try:
        import onnxruntime
    except ImportError:
        return info
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = example_input(cfg, img_size, 3, seed=1)
    (got,) = session.run(["tokens"], {"images": check.numpy()})
    with torch.no_grad():
        want = encoder(check)
    diff = float((torch.from_numpy(got) - want).abs().max())
    if diff > 1e-4:
        raise ExportError(f"ONNX export '{path}' differs from the PyTorch encoder by {diff:.2e} (> 1e-4)")
    info["onnx_max_abs_diff"] = diff
    return info


WRITERS = {"timm": write_timm, "hf": write_hf, "safetensors": write_safetensors, "onnx": write_onnx,
           "vjepa2": write_vjepa2}


def check_export_target(out: Path, overwrite: bool) -> None:
    """``--out`` must be a new or empty folder, or (``overwrite``) a folder whose whole content the export replaces;
    never a checkpoint folder, a folder inside one, or a training output folder holding checkpoints."""
    for folder in (out, *out.parents):
        if folder.is_dir() and is_checkpoint_dir(folder):
            raise ExportError(f"--out '{out}' is {'' if folder == out else 'inside '}the checkpoint folder "
                              f"'{folder}'; an export never writes into a checkpoint (choose another folder)")
    if out.is_dir() and checkpoint_dirs(out):
        raise ExportError(f"--out '{out}' is a training output folder (it holds {checkpoint_dirs(out)[-1].name}); an "
                          f"export never writes over a run (choose another folder)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out '{out}' is a file (expected a folder to write the export into)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out '{out}' is not empty; pass --overwrite to replace its whole content with the "
                          f"export, or choose an empty folder")


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``; an old ``out`` is replaced as a whole (no stale file is left)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".old-{out.name}-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def export_encoder(ckpt: str | Path, fmt: str, out: str | Path, which: str | None = None,
                   img_size: int | None = None, overwrite: bool = False) -> Path:
    """Write the encoder ``which`` (default: the method's first, I-JEPA's EMA target) of checkpoint ``ckpt`` (newest
    in a training folder) to ``out`` in format ``fmt``; ``img_size`` defaults to the training ``data.img_size``.
    ``out`` must be new or empty unless ``overwrite`` (see ``check_export_target``). Every format is written into a
    temporary sibling folder, then moved to ``out``, so a failed export leaves nothing half-written. Returns
    ``out``."""
    if fmt not in FORMATS:
        raise ExportError(f"--to '{fmt}' is unknown (expected one of {list(FORMATS)})")
    out, target = Path(out), Path(os.path.abspath(out))  # target: '..' and '.' spelled out, symlinks kept
    check_export_target(target, overwrite)
    encoder, cfg, ckpt_path = load_checkpoint_encoder(ckpt, which)
    if target in Path(os.path.abspath(ckpt_path)).parents:
        raise ExportError(f"--out '{out}' holds the checkpoint being exported ('{ckpt_path}'); an export never "
                          f"replaces its source (choose another folder)")
    img_size = img_size or cfg.data.img_size
    if img_size % encoder.patch_size:
        raise ExportError(f"--img-size {img_size} is not divisible by the encoder's patch size {encoder.patch_size}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed export of this process id
    tmp.mkdir()
    try:
        info = WRITERS[fmt](encoder, cfg, img_size, tmp)
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        meta = dict(format=fmt, encoder=cfg.model.encoder, img_size=img_size, source=str(ckpt_path.resolve()),
                    which=which or get_method(cfg.method).default_encoder, **info)
        (tmp / "export.json").write_text(json.dumps(meta, indent=2))
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------- readers
def is_export_path(path: str | Path) -> bool:
    return (Path(path) / "export.json").is_file()


def load_export(path: str | Path) -> tuple[nn.Module, object, dict]:
    """(our encoder with the exported weights, training config, export.json) of a safetensors/timm/hf export."""
    path = Path(path)
    if not is_export_path(path):
        raise ExportError(f"'{path}' is not an export folder (no export.json; write one with `jepa export`)")
    meta = json.loads((path / "export.json").read_text())
    cfg = load_config(path / "config.yaml")
    encoder = get_method(cfg.method).build_encoder(cfg)
    fmt = meta.get("format")
    if fmt == "safetensors":
        state = read_weights(path / "encoder.safetensors")
    elif fmt == "timm" and isinstance(encoder, CNNEncoder):
        state = {f"backbone.{k}": v for k, v in read_weights(path / "model.safetensors").items()}
        state.update({f"norm.{k}": v for k, v in read_weights(path / "token_norm.safetensors").items()})
    elif fmt == "timm":
        state = read_weights(path / "model.safetensors")
        state.pop("pos_embed", None)
    elif fmt == "hf":
        state = from_hf(read_weights(path / "model.safetensors"), len(encoder.blocks))
    elif fmt == "vjepa2":
        from .export_vjepa2 import from_vjepa2

        state = from_vjepa2(path)
    else:
        raise ExportError(f"export '{path}' has format {fmt!r}; evaluation reads safetensors, timm or hf exports "
                          f"(ONNX is for deployment: evaluate its source checkpoint {meta.get('source')!r} instead)")
    load_strict(encoder, state, path)
    return encoder.eval(), cfg, meta


def cnn_tokens_from_timm(features: torch.Tensor, token_norm: dict[str, torch.Tensor]) -> torch.Tensor:
    """timm CNN ``forward_features`` (B, C, h, w) + ``token_norm.safetensors`` -> our tokens (B, h*w, C)."""
    tokens = features.flatten(2).transpose(1, 2)
    return F.layer_norm(tokens, tokens.shape[-1:], token_norm["weight"], token_norm["bias"], eps=1e-6)
