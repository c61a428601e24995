"""VL-JEPA (Chen, Shukor, Moutakanni, Chung et al., arXiv 2512.10942): predict the embedding of a target text from an
image and a text query, in the Y-encoder's embedding space.

    x_tokens = X(image)                       (B, N, Dx)  frozen by default; read from the token cache when
                                                          ``data.cache_tokens`` (the X forward dominates otherwise)
    pred     = predictor(x_tokens, query)     (B, Dy)     visual tokens + query tokens -> backbone -> mean -> linear
    target   = Y(target text)                 (B, Dy)     trained at ``vl.y_lr_mult`` x the LR (0: frozen)
    loss     = bidirectional InfoNCE(pred, target) with a learnable temperature, rows with the same target text
               all positive (+ optional SIGReg / VICReg on pred); or ``loss.kind=cosine``

``vl.head=linear`` is the baseline without predictor and query: the mean X token mapped linearly into Y space.
Frozen X and frozen Y are teachers (``x_encoder``, ``y_encoder``; never wrapped, saved by name); a trained one is a
submodule of the online model. ``parts.monitor_encoder`` is a ``VLEmbedder`` (the online model + its teachers) that
monitors and ``jepa eval vl-retrieval | vl-classify | vqa`` embed with.

batch: ``pixels`` (B, 3, H, W) or ``tokens`` (B, N, Dx); ``text['query']`` / ``text['target']`` with ``input_ids``
and ``attention_mask`` (B, L); ``labels`` (B,): the id of each row's target text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, knob
from ..losses import LogitScale, cosine_embedding_loss, info_nce, sigreg, variance_covariance
from ..sections import DataConfig, PredictorConfig, TrainConfig
from . import MethodOutput, MethodParts, Teacher, register_method


@dataclass
class VLDataConfig(DataConfig):
    """(image, query, target text) triples: ``source`` flickr (``root``: images/ + captions.txt, split by
    ``split_file``), easyvqa (the PyPI package's data), jsonl (``root``: a JSONL file)."""

    source: Literal["flickr", "easyvqa", "jsonl"] = knob("flickr", resumable=True)
    root: str = knob("../shared/data/flickr8k-1k", resumable=True)
    split_file: str = knob("", resumable=True)  # '': the versioned data/splits/flickr8k_1k.json
    caption_query: str = "describe the image"  # the query of caption pairs
    max_query_len: int = knob(32, gt=0)
    max_target_len: int = knob(48, gt=0)
    img_size: int = knob(128, gt=0)
    batch_size: int = knob(128, gt=1)  # InfoNCE needs negatives
    augment: bool = False  # False: resize + center crop (the token cache's view); True: random-resized crops
    cache_tokens: bool = False  # encode every image once with the frozen X-encoder, train on the cache
    token_cache_dir: str = knob(".cache/vl_tokens", resumable=True)
    cache_dtype: Literal["bf16", "fp32"] = "bf16"


@dataclass
class VLConfig:
    x_encoder: str = "random:vit_small"  # a checkpoint / export folder, timm:<name> or random:<encoder>
    x_which: str = "target"  # which encoder of a training checkpoint
    x_lr_mult: float = knob(0.0, ge=0)  # 0: frozen X-encoder (a teacher)
    y_encoder: str = "minilm"  # minilm (the packaged all-MiniLM-L6-v2) | hf:<folder> | open_clip:<model>
    y_pretrained: bool = True
    y_lr_mult: float = knob(0.05, ge=0)  # 0: frozen Y-encoder (the paper: 0.05)
    head: Literal["predictor", "linear"] = "predictor"  # linear: mean X token -> linear map (baseline)
    query_embedding: Literal["learned", "y_encoder"] = "y_encoder"  # the query's token embeddings
    use_query: bool = True


@dataclass
class VLPredictorConfig(PredictorConfig):
    init: Literal["random", "minilm"] = "random"  # minilm: the transformer's layers from the pretrained MiniLM
    causal: bool = False  # causal attention / forward-only scans (the paper's v2 ablation)
    norm: Literal["pre", "post"] = "pre"  # transformer blocks: pre-norm (ViT) or post-norm (BERT, MiniLM's)
    norm_eps: float = knob(1e-6, gt=0)
    minilm_layers: Literal["last", "first"] = "last"


@dataclass
class VLLossConfig:
    kind: Literal["infonce", "cosine"] = "infonce"
    temperature: float = knob(0.07, gt=0)  # initial InfoNCE temperature
    learn_temperature: bool = True
    gather: bool = True  # negatives from every process
    regularizer: Literal["none", "sigreg", "vicreg"] = "none"  # on the predicted embeddings
    reg_weight: float = knob(0.0, ge=0)


@dataclass
class VLJEPAConfig(TrainConfig):
    method: str = "vljepa"
    data: VLDataConfig = field(default_factory=VLDataConfig)
    vl: VLConfig = field(default_factory=VLConfig)
    predictor: VLPredictorConfig = field(default_factory=VLPredictorConfig)
    loss: VLLossConfig = field(default_factory=VLLossConfig)

    def check(self, prefix: str) -> None:
        v, p, d = self.vl, self.predictor, self.data
        if d.cache_tokens and v.x_lr_mult > 0:
            raise ConfigError(f"config key 'data.cache_tokens' is true but vl.x_lr_mult={v.x_lr_mult} trains the "
                              f"X-encoder; cached tokens need a frozen X-encoder (vl.x_lr_mult=0)")
        if d.cache_tokens and d.augment:
            raise ConfigError("config key 'data.cache_tokens' is true with data.augment=true; the cache holds one "
                              "fixed view per image (set data.augment=false)")
        if p.init == "minilm":
            if v.head != "predictor":
                raise ConfigError("config key 'predictor.init' is 'minilm' but vl.head is 'linear' (no predictor)")
            from predictors.minilm_init import check_minilm_compatible

            try:
                check_minilm_compatible(p.backbone, p.dim, p.depth, p.num_heads, p.mlp_ratio, p.norm, p.norm_eps)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if p.causal and p.backbone != "transformer" and p.bidirectional != "forward":
            raise ConfigError(f"config key 'predictor.causal' is true with predictor.backbone={p.backbone}: set "
                              f"predictor.bidirectional=forward (the Mamba-3 blocks then scan left to right only)")
        if self.loss.regularizer != "none" and self.loss.reg_weight == 0:
            raise ConfigError(f"config key 'loss.regularizer' is '{self.loss.regularizer}' but loss.reg_weight is 0")


class PooledLinear(nn.Module):
    """The no-predictor baseline: forward(x_tokens (B, N, Dx), ...) -> (B, Dy), the mean token mapped linearly."""

    def __init__(self, x_dim: int, y_dim: int):
        super().__init__()
        self.proj = nn.Linear(x_dim, y_dim)

    def forward(self, x_tokens, query_ids=None, query_mask=None, query_embeds=None):
        return self.proj(x_tokens.mean(1))


class VLJEPA(nn.Module):
    """forward(batch, teachers) -> MethodOutput. Submodules: ``predictor``, ``logit_scale``, and ``y_encoder`` /
    ``x_encoder`` when they train (``lr_multipliers`` gives their LR factors to the trainer)."""

    def __init__(self, predictor: nn.Module, y_encoder: nn.Module | None, x_encoder: nn.Module | None,
                 loss: VLLossConfig, query_embedding: str, use_query: bool, y_lr_mult: float, x_lr_mult: float):
        super().__init__()
        self.predictor = predictor
        if y_encoder is not None:
            self.y_encoder = y_encoder
        if x_encoder is not None:
            self.x_encoder = x_encoder
        self.logit_scale = LogitScale(loss.temperature, learnable=loss.learn_temperature)
        self.loss_cfg = loss
        self.query_embedding, self.use_query = query_embedding, use_query
        self.lr_multipliers = {"y_encoder": y_lr_mult, "x_encoder": x_lr_mult}

    # ---------------------------------------------------------------- the parts, trained or frozen
    def y(self, teachers) -> nn.Module:
        return self.y_encoder if hasattr(self, "y_encoder") else teachers["y_encoder"]

    def x_tokens(self, batch, teachers) -> torch.Tensor:
        """(B, N, Dx): the cached tokens, the trained X-encoder's, or the frozen one's (no grad)."""
        if batch.tokens is not None:
            return batch.tokens.float()  # bf16 cache; autocast casts back where it runs
        if hasattr(self, "x_encoder"):
            return self.x_encoder(batch.pixels)
        with torch.no_grad():
            return teachers["x_encoder"](batch.pixels)

    def predict(self, x_tokens: torch.Tensor, query: dict | None, teachers) -> torch.Tensor:
        """(B, N, Dx) tokens + tokenized query -> (B, Dy) predicted embedding (not normalised)."""
        if not self.use_query or query is None:
            return self.predictor(x_tokens, None, None)
        ids, mask = query["input_ids"], query["attention_mask"]
        embeds = None
        if self.query_embedding == "y_encoder":
            y = self.y(teachers)
            with torch.set_grad_enabled(torch.is_grad_enabled() and hasattr(self, "y_encoder")):
                embeds = y.token_embeddings(ids)
        return self.predictor(x_tokens, ids, mask, query_embeds=embeds)

    def embed_text(self, text: dict, teachers) -> torch.Tensor:
        """Tokenized text -> (B, Dy) Y-encoder embeddings (no grad through a frozen Y)."""
        y = self.y(teachers)
        with torch.set_grad_enabled(torch.is_grad_enabled() and hasattr(self, "y_encoder")):
            return y(text["input_ids"], text["attention_mask"])

    # ---------------------------------------------------------------- the step
    def forward(self, batch, teachers: dict[str, nn.Module]) -> MethodOutput:
        if batch.text is None or "target" not in batch.text:
            raise ValueError("a VL-JEPA batch needs text['target'] (tokenized target texts); got "
                             f"{None if batch.text is None else sorted(batch.text)}")
        pred = self.predict(self.x_tokens(batch, teachers), batch.text.get("query"), teachers)
        target = self.embed_text(batch.text["target"], teachers)
        c = self.loss_cfg
        scale = self.logit_scale()
        if c.kind == "infonce":
            main = info_nce(pred, target, scale, keys=batch.labels, gather=c.gather)
        else:
            main = cosine_embedding_loss(pred, target)
        loss, logs = main, {f"loss_{c.kind}": main.detach(), "temperature": 1.0 / scale.detach()}
        if c.regularizer == "sigreg":  # sqrt(D) x unit vectors: isotropic ones project to ~N(0, 1), SIGReg's target
            reg = sigreg(F.normalize(pred.float(), dim=-1) * pred.shape[-1] ** 0.5)
            loss = loss + c.reg_weight * reg
            logs["sigreg"] = reg.detach()
        elif c.regularizer == "vicreg":
            variance, covariance = variance_covariance(F.normalize(pred.float(), dim=-1))
            loss = loss + c.reg_weight * (variance + covariance)
            logs.update(vic_variance=variance.detach(), vic_covariance=covariance.detach())
        with torch.no_grad():
            p, t = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
            logs["cosine"] = (p * t).sum(-1).mean()
            hits = (p @ t.T).argmax(1)
            labels = batch.labels if batch.labels is not None else torch.arange(len(p), device=p.device)
            logs["batch_top1"] = (labels[hits] == labels).float().mean()
        return MethodOutput(loss, logs, {"pred": pred, "target": target})


class VLEmbedder(nn.Module):
    """What evaluation and monitors embed with: the method's online model and its teachers.

    ``image_query(pixels (B, 3, H, W) | None, query {input_ids, attention_mask} | None, tokens (B, N, Dx) | None)
    -> (B, Dy)`` L2-normalised predicted embeddings; ``text(tokenized) -> (B, Dy)`` L2-normalised Y embeddings;
    ``tokenizer``: texts -> tokenized.
    """

    def __init__(self, method: VLJEPA, teachers: dict[str, nn.Module], tokenizer):
        super().__init__()
        self.method = method
        self.teachers = nn.ModuleDict(teachers)
        self.tokenizer = tokenizer

    def _batch(self, pixels, tokens):
        from types import SimpleNamespace

        return SimpleNamespace(pixels=pixels, tokens=tokens)

    @torch.no_grad()
    def image_query(self, pixels=None, query=None, tokens=None) -> torch.Tensor:
        x = self.method.x_tokens(self._batch(pixels, tokens), self.teachers)
        return F.normalize(self.method.predict(x, query, self.teachers).float(), dim=-1)

    @torch.no_grad()
    def text(self, tokenized: dict) -> torch.Tensor:
        return F.normalize(self.method.embed_text(tokenized, self.teachers).float(), dim=-1)


# ---------------------------------------------------------------- building
def build_x_encoder(cfg) -> nn.Module:
    """The X-encoder ``vl.x_encoder`` names, as images -> (B, N, Dx) tokens (``jepa.encoder_spec``)."""
    from ..encoder_spec import EncoderSpecError, resolve_encoder, token_module

    try:
        resolved = resolve_encoder(cfg.vl.x_encoder, cfg.vl.x_which, cfg.trainer.seed, cfg.data.img_size,
                                   option="config key 'vl.x_encoder'")
    except EncoderSpecError as err:
        raise ConfigError(str(err)) from None
    if resolved.clip is not None:
        raise ConfigError(f"config key 'vl.x_encoder' ('{cfg.vl.x_encoder}') is a video encoder; VL-JEPA here "
                          f"takes image encoders")
    module = token_module(resolved)
    if not hasattr(module, "embed_dim"):
        raise ConfigError(f"config key 'vl.x_encoder' ('{cfg.vl.x_encoder}') has no embed_dim")
    return module


def build_y_encoder(cfg) -> nn.Module:
    from encoders.text import TextEncoderError, build_text_encoder

    try:
        return build_text_encoder(cfg.vl.y_encoder, pretrained=cfg.vl.y_pretrained,
                                  max_length=max(cfg.data.max_query_len, cfg.data.max_target_len))
    except TextEncoderError as err:
        raise ConfigError(f"config key 'vl.y_encoder': {err}") from None


def build_vl_predictor(cfg, x_dim: int, y_encoder: nn.Module) -> nn.Module:
    from predictors.backbones import backbone_options
    from predictors.vl_predictor import VLPredictor

    v, p = cfg.vl, cfg.predictor
    if v.head == "linear":
        return PooledLinear(x_dim, y_encoder.embed_dim)
    options = {name: getattr(p, name) for name in backbone_options(p.backbone) if hasattr(p, name)}
    tokenizer = y_encoder.tokenizer()
    predictor = VLPredictor(x_dim, y_encoder.embed_dim, dim=p.dim, depth=p.depth, num_heads=p.num_heads,
                            backbone=p.backbone, query_embedding=v.query_embedding,
                            vocab_size=tokenizer.vocab_size, max_query_len=cfg.data.max_query_len,
                            query_dim=y_encoder.token_dim, use_query=v.use_query, **options)
    if p.init == "minilm":
        from predictors.minilm_init import init_from_minilm

        init_from_minilm(predictor, layers=p.minilm_layers)
    return predictor


@register_method("vljepa", config=VLJEPAConfig, build_encoder=lambda cfg: build_x_encoder(cfg), pipeline="vl_pairs",
                 encoders={"x": "teacher:x_encoder"})
def build_vljepa(cfg: VLJEPAConfig) -> MethodParts:
    v = cfg.vl
    x_encoder, y_encoder = build_x_encoder(cfg), build_y_encoder(cfg)
    predictor = build_vl_predictor(cfg, x_encoder.embed_dim, y_encoder)
    x_trained, y_trained = v.x_lr_mult > 0, v.y_lr_mult > 0
    if x_trained:
        x_encoder.train().requires_grad_(True)
    method = VLJEPA(predictor, y_encoder if y_trained else None, x_encoder if x_trained else None, cfg.loss,
                    v.query_embedding, v.use_query, v.y_lr_mult, v.x_lr_mult)
    teachers = {}
    if not x_trained:
        teachers["x_encoder"] = Teacher(x_encoder.requires_grad_(False))
    if not y_trained:
        teachers["y_encoder"] = Teacher(y_encoder.eval().requires_grad_(False))
    tokenizer = y_encoder.tokenizer()
    embedder = VLEmbedder(method, {name: t.module for name, t in teachers.items()}, tokenizer)
    return MethodParts(method, teachers, monitor_encoder=embedder, token_grid=(), tokenizer=tokenizer,
                       input_encoder=None if x_trained else x_encoder)
