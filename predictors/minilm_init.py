"""``predictor.init=minilm``: start the VL predictor's transformer from the encoder layers of the pretrained
all-MiniLM-L6-v2 (as VL-JEPA starts its predictor from the last layers of a language model).

A BERT layer is a post-norm block: ``x = LN(x + Wo·attn(Wq x, Wk x, Wv x)); x = LN(x + W2·gelu(W1 x))``, i.e.
the transformer backbone's ``norm="post"`` block, whose timm ``Attention`` holds q, k and v in one fused ``qkv`` linear
(rows: all query heads, then all key heads, then all value heads; within each, head-major as in BERT).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from .backbones.transformer import TransformerBackbone

# all-MiniLM-L6-v2's encoder (its config.json): 6 BERT layers
MINILM = dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6,
              layer_norm_eps=1e-12, hidden_act="gelu")
_LAYER_CHOICES = ("last", "first")


def check_minilm_compatible(backbone: str, dim: int, depth: int, num_heads: int, mlp_ratio: float, norm: str,
                            norm_eps: float, *, qkv_bias: bool = True, gated_attention: bool = False) -> None:
    """Raise ValueError naming every ``predictor.*`` option that keeps MiniLM's layers from loading into the
    predictor (so a config can fail before training starts); return None when they fit."""
    wrong = []
    if backbone != "transformer":
        wrong.append(f"predictor.backbone is '{backbone}' (expected 'transformer')")
    if norm != "post":
        wrong.append(f"predictor.norm is '{norm}' (expected 'post': BERT layers are post-norm)")
    if not math.isclose(norm_eps, MINILM["layer_norm_eps"], rel_tol=1e-6):
        wrong.append(f"predictor.norm_eps is {norm_eps} (expected {MINILM['layer_norm_eps']})")
    if dim != MINILM["hidden_size"]:
        wrong.append(f"predictor.dim is {dim} (expected {MINILM['hidden_size']})")
    if num_heads != MINILM["num_attention_heads"]:
        wrong.append(f"predictor.num_heads is {num_heads} (expected {MINILM['num_attention_heads']})")
    if mlp_ratio * MINILM["hidden_size"] != MINILM["intermediate_size"]:
        wrong.append(f"predictor.mlp_ratio is {mlp_ratio} (expected "
                     f"{MINILM['intermediate_size'] / MINILM['hidden_size']})")
    if not 1 <= depth <= MINILM["num_hidden_layers"]:
        wrong.append(f"predictor.depth is {depth} (expected 1 to {MINILM['num_hidden_layers']}: MiniLM's layers)")
    if not qkv_bias:
        wrong.append("predictor.qkv_bias is False (expected True: BERT's q, k, v have biases)")
    if gated_attention:
        wrong.append("predictor.gated_attention is True (expected False: MiniLM has no attention gate)")
    if wrong:
        raise ValueError("predictor.init=minilm needs a predictor shaped like all-MiniLM-L6-v2, but "
                         + "; ".join(wrong))


def load_minilm(path: str | Path | None = None) -> nn.Module:
    """The Hugging Face ``BertModel`` at ``path`` (default: ``encoders.text.minilm_path()``), offline, in eval mode."""
    from transformers import AutoModel

    if path is None:
        from encoders.text import minilm_path

        path = minilm_path()
    return AutoModel.from_pretrained(str(path), local_files_only=True).eval()


def init_from_minilm(predictor: nn.Module, path: str | Path | None = None, layers: str = "last") -> list[str]:
    """Copy MiniLM encoder layers into ``predictor.backbone`` (a ``VLPredictor`` built with backbone="transformer",
    norm="post", norm_eps=1e-12, dim=384, num_heads=12, mlp_ratio=4, depth <= 6).

    ``layers="last"``: block j gets layer ``6 - depth + j`` (the paper keeps an LM's last layers); ``"first"``:
    layer j. -> the names (in ``predictor.named_parameters()``) of the copied tensors. Other parameters (input and
    output maps, query embeddings, the final norm) keep their initialisation.
    """
    if layers not in _LAYER_CHOICES:
        raise ValueError(f"MiniLM layers '{layers}' is unknown (expected one of {list(_LAYER_CHOICES)})")
    backbone = getattr(predictor, "backbone", None)
    if not isinstance(backbone, TransformerBackbone):
        name = getattr(predictor, "backbone_name", type(backbone).__name__)
        raise ValueError(f"predictor.init=minilm needs predictor.backbone 'transformer' (got '{name}')")
    options = backbone.options
    check_minilm_compatible("transformer", options["dim"], options["depth"], options["num_heads"],
                            options["mlp_ratio"], options["norm"], options["norm_eps"], qkv_bias=options["qkv_bias"],
                            gated_attention=options["gated_attention"])
    model = load_minilm(path)
    _check_model_config(model.config, path, options["depth"])
    hf_layers = model.encoder.layer
    depth = options["depth"]
    first = len(hf_layers) - depth if layers == "last" else 0
    prefix = _module_name(predictor, backbone)
    copied = []
    with torch.no_grad():
        for j, block in enumerate(backbone.blocks):
            for target, source in _layer_pairs(block, hf_layers[first + j]).items():
                param = block.get_parameter(target)
                if param.shape != source.shape:
                    raise ValueError(f"MiniLM layer {first + j} tensor for {target} has shape {tuple(source.shape)} "
                                     f"(the predictor's is {tuple(param.shape)})")
                param.copy_(source)
                copied.append(f"{prefix}blocks.{j}.{target}")
    return copied


def _layer_pairs(block: nn.Module, layer: nn.Module) -> dict[str, torch.Tensor]:
    """Predictor block parameter name -> the HF ``BertLayer`` tensor it takes (q, k, v stacked into qkv)."""
    attention = layer.attention
    qkv = (attention.self.query, attention.self.key, attention.self.value)
    return {
        "attn.qkv.weight": torch.cat([linear.weight for linear in qkv], dim=0),
        "attn.qkv.bias": torch.cat([linear.bias for linear in qkv], dim=0),
        "attn.proj.weight": attention.output.dense.weight,
        "attn.proj.bias": attention.output.dense.bias,
        "norm1.weight": attention.output.LayerNorm.weight,
        "norm1.bias": attention.output.LayerNorm.bias,
        "mlp.fc1.weight": layer.intermediate.dense.weight,
        "mlp.fc1.bias": layer.intermediate.dense.bias,
        "mlp.fc2.weight": layer.output.dense.weight,
        "mlp.fc2.bias": layer.output.dense.bias,
        "norm2.weight": layer.output.LayerNorm.weight,
        "norm2.bias": layer.output.LayerNorm.bias,
    }


def _check_model_config(config, path, depth: int) -> None:
    """The model at ``path`` must be MiniLM-shaped: a different checkpoint there is an error, not a partial copy."""
    wrong = [f"{key}={getattr(config, key, None)!r} (expected {value!r})" for key, value in MINILM.items()
             if key != "num_hidden_layers" and getattr(config, key, None) != value]
    if getattr(config, "num_hidden_layers", 0) < depth:
        wrong.append(f"num_hidden_layers={getattr(config, 'num_hidden_layers', None)} (the predictor has {depth})")
    if wrong:
        raise ValueError(f"the model at '{path or 'minilm_path()'}' is not all-MiniLM-L6-v2 shaped: {', '.join(wrong)}")


def _module_name(root: nn.Module, module: nn.Module) -> str:
    """'backbone.' for ``root.backbone`` (the dotted prefix of ``module`` inside ``root``)."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError("the backbone is not a submodule of the predictor")
