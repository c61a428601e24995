"""Gradient accumulation of 4 micro-batches == one batch 4x as large (online and EMA weights, fp32)."""

import torch

from data.batch import Batch
from jepa.masks import MaskBatch, MultiBlockMaskSampler
from jepa.methods import build_method
from jepa.trainer import Trainer, make_accelerator

from conftest import tiny_config


class FixedBatches:
    """A loader that replays given batches, with the sampler interface the trainer expects."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)

    def set_position(self, epoch, start):
        """The batches are replayed as given; there is no position to set."""


def split(batch, parts):
    """Cut a batch into micro-batches, trimming each one's context padding to its own longest context."""
    size = len(batch) // parts
    out = []
    for i in range(parts):
        sl = slice(i * size, (i + 1) * size)
        masks = batch.masks[0]
        pad = masks.context_pad[sl]
        longest = int((~pad).sum(1).max())
        micro_masks = MaskBatch(masks.context_idx[sl, :longest], pad[:, :longest], masks.target_idx[sl])
        out.append(Batch(batch.pixels[sl], [micro_masks], labels=batch.labels[sl], skipped=torch.tensor(0)))
    return out


def train(batches, accum, tmp_path):
    cfg = tiny_config(f"trainer.grad_accum_steps={accum}", "trainer.max_steps=3", "optim.grad_clip=1.0",
                      "trainer.mixed_precision=fp32", output_dir=tmp_path)
    torch.manual_seed(0)
    parts = build_method(cfg)
    loader = FixedBatches(batches)
    trainer = Trainer(cfg, parts, loader, loader, accelerator=make_accelerator(cfg))
    it = iter([batch.to(trainer.device) for batch in batches])
    for _ in range(cfg.trainer.max_steps):
        trainer._train_step(it, {})
    return ({k: v.cpu() for k, v in trainer.method.state_dict().items()},
            {k: v.cpu() for k, v in trainer.teachers["target_encoder"].state_dict().items()})


def test_accumulation_equals_big_batch(tmp_path):
    torch.manual_seed(1)
    sampler = MultiBlockMaskSampler((4, 4), min_keep=2)
    big = []
    for step in range(3):
        masks = sampler(16, (0, 0, step))
        big.append(Batch(torch.randn(16, 3, 32, 32), [masks], labels=torch.zeros(16, dtype=torch.long)))
    micro = [m for batch in big for m in split(batch, 4)]
    online_big, target_big = train(big, 1, tmp_path / "big")
    online_acc, target_acc = train(micro, 4, tmp_path / "acc")
    for name in online_big:
        torch.testing.assert_close(online_acc[name], online_big[name], rtol=0, atol=1e-6, msg=name)
    for name in target_big:
        torch.testing.assert_close(target_acc[name], target_big[name], rtol=0, atol=1e-6, msg=name)
    torch.manual_seed(0)
    initial = build_method(tiny_config()).model.state_dict()
    assert any(not torch.equal(online_big[name], value) for name, value in initial.items())  # training moved them
