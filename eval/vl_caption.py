"""``jepa eval vl-caption``: decode text from VL-JEPA's predicted embeddings only when needed, and score it.

Both decoders of ``eval.decode`` read the same predicted embeddings (the model's prediction for each test image with
its caption query):
- ``bank``: the nearest train caption (Y embeddings of every train caption of the source);
- ``generative``: a small ``predictors.y_decoder.YDecoder`` trained here on (Y embedding, tokens) of the train
  captions, greedy decoding. Its weights are saved to ``<out>/y_decoder.safetensors`` with ``y_decoder.json`` (the
  decoder the streaming evaluation reads).
Scores: BLEU-4 and CIDEr-D (``eval.caption_metrics``) against the five captions of each test image.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import save_file

from data.vl_sources import flickr_source
from jepa.config import knob
from predictors.y_decoder import YDecoder, fit_y_decoder

from .caption_metrics import bleu, cider
from .decode import CaptionBank, GenerativeDecoder
from .results import Record, format_table
from .tasks import EvalRun, register_task
from .vl import vl_setup
from .vl_embed import embed_images, embed_texts

DECODER_FILE, DECODER_CONFIG = "y_decoder.safetensors", "y_decoder.json"


@dataclass
class DecoderConfig:
    dim: int = knob(256, gt=0)
    depth: int = knob(4, gt=0)
    num_heads: int = knob(4, gt=0)
    max_len: int = knob(32, gt=1)
    prefix_len: int = knob(4, gt=0)

    def check(self, prefix: str) -> None:
        from jepa.config import ConfigError

        if self.dim % self.num_heads:
            raise ConfigError(f"config key '{prefix}num_heads' ({self.num_heads}) must divide {prefix}dim "
                              f"({self.dim})")


@dataclass
class CaptionConfig:
    split: str = "test"
    decoders: list[str] = knob(factory=lambda: ["bank", "generative"])
    epochs: int = knob(30, gt=0)  # Y-decoder training epochs over the train captions
    lr: float = knob(1e-3, gt=0)
    batch_size: int = knob(128, gt=0)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    query: str = ""  # '': the model's training caption query

    def check(self, prefix: str) -> None:
        from jepa.config import ConfigError

        unknown = [d for d in self.decoders if d not in ("bank", "generative")]
        if unknown or not self.decoders:
            raise ConfigError(f"config key '{prefix}decoders' is {self.decoders}; expected a non-empty list of "
                              f"'bank' and 'generative'")


def train_decoder(embedder, captions: list[str], c: CaptionConfig, device, autocast, seed: int, say) -> YDecoder:
    """A Y-decoder fitted on (Y embedding, tokens) of ``captions``."""
    tokenizer = embedder.tokenizer
    tokens = tokenizer(captions, max_length=c.decoder.max_len)
    d = c.decoder
    special = tokenizer._load()  # the HF tokenizer: its [CLS] / [SEP] start and end every caption
    targets = embed_texts(embedder, captions, device, autocast=autocast)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = YDecoder(targets.shape[-1], tokenizer.vocab_size, dim=d.dim, depth=d.depth, num_heads=d.num_heads,
                           max_len=d.max_len, prefix_len=d.prefix_len, bos_id=special.cls_token_id,
                           eos_id=special.sep_token_id, pad_id=tokenizer.pad_id)
    history = fit_y_decoder(decoder, targets.cpu(), tokens["input_ids"], tokens["attention_mask"], c.epochs, c.lr,
                            c.batch_size, device, seed=seed)
    say(f"Y-decoder: {sum(p.numel() for p in decoder.parameters()) / 1e6:.1f} M parameters, {c.epochs} epochs on "
        f"{len(captions)} captions, loss {history[0]:.3f} -> {history[-1]:.3f}")
    return decoder


@register_task("vl_caption", config=CaptionConfig, needs="vl")
def run_vl_caption(run: EvalRun) -> list[Record]:
    """Captions decoded from predicted embeddings (caption bank, trained Y-decoder): BLEU-4, CIDEr-D."""
    if (setup := vl_setup(run)) is None:
        return []
    c, embedder, device, autocast = setup
    split_file = run.vl.cfg.data.split_file or None
    train, test = flickr_source(run.data, "train", split_file), flickr_source(run.data, c.split, split_file)
    train_captions = [p.target for p in train.pairs]
    references = test.captions_by_image()
    pred = embed_images(embedder, test.images, c.query or run.vl.caption_query, run.img_size, device,
                        autocast=autocast)
    decoded = {}
    if "bank" in c.decoders:
        bank = CaptionBank(train_captions, embed_texts(embedder, train_captions, device, autocast=autocast))
        decoded["bank"] = bank.decode(pred)
    if "generative" in c.decoders:
        decoder = train_decoder(embedder, train_captions, c, device, autocast, run.cfg.seed, run.say)
        decoded["generative"] = GenerativeDecoder(decoder, embedder.tokenizer).decode(pred)
        run.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items() if k != "head.weight"}
        save_file(state, str(run.out / DECODER_FILE))  # head.weight is token_embed.weight (tied)
        (run.out / DECODER_CONFIG).write_text(json.dumps(
            {**asdict(c.decoder), "y_dim": decoder.y_dim, "vocab_size": decoder.vocab_size,
             "bos_id": decoder.bos_id, "eos_id": decoder.eos_id, "pad_id": decoder.pad_id,
             "vl_checkpoint": str(run.vl.ckpt)}, indent=2))
    rows, records = [], []
    for kind, texts in decoded.items():
        scores = {"BLEU-4": bleu(references, texts), "CIDEr-D": cider(references, texts)}
        rows.append((kind, *(f"{v:.3f}" for v in scores.values()), texts[0][:60]))
        records += [run.record(f"{kind}/{name}", value, split=c.split) for name, value in scores.items()]
    run.say(f"{c.split}: {len(test.images)} images x {len(references[0])} reference captions")
    run.say(format_table(rows, ("decoder", "BLEU-4", "CIDEr-D", "first decode")))
    return records
