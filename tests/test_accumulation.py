"""Gradient accumulation of 4 micro-batches == one batch 4x as large (online and EMA weights, fp32)."""
import torch

from jepa.masks import MultiBlockMaskSampler
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
    size = batch["images"].shape[0] // parts
    out = []
    for i in range(parts):
        sl = slice(i * size, (i + 1) * size)
        micro = {k: v[sl] for k, v in batch.items() if k != "skipped"}
        longest = int((~micro["context_pad"]).sum(1).max())
        micro["context_idx"] = micro["context_idx"][:, :longest]
        micro["context_pad"] = micro["context_pad"][:, :longest]
        micro["skipped"] = torch.tensor(0)
        out.append(micro)
    return out


def train(batches, accum, tmp_path):
    cfg = tiny_config(f"trainer.grad_accum_steps={accum}", "trainer.max_steps=3", "optim.grad_clip=1.0",
                      "trainer.mixed_precision=fp32", output_dir=tmp_path)
    torch.manual_seed(0)
    method, target = build_method(cfg)
    loader = FixedBatches(batches)
    trainer = Trainer(cfg, method, target, loader, loader, accelerator=make_accelerator(cfg))
    it = iter([{k: v.to(trainer.device) for k, v in batch.items()} for batch in batches])
    for _ in range(cfg.trainer.max_steps):
        trainer._train_step(it, {})
    return ({k: v.cpu() for k, v in trainer.method.state_dict().items()},
            {k: v.cpu() for k, v in trainer.target_encoder.state_dict().items()})


def test_accumulation_equals_big_batch(tmp_path):
    torch.manual_seed(1)
    sampler = MultiBlockMaskSampler((4, 4), min_keep=2)
    big = []
    for step in range(3):
        masks = sampler(16, (0, 0, step))
        big.append({"images": torch.randn(16, 3, 32, 32), "labels": torch.zeros(16, dtype=torch.long),
                    "context_idx": masks.context_idx, "context_pad": masks.context_pad,
                    "target_idx": masks.target_idx, "skipped": torch.tensor(0)})
    micro = [m for batch in big for m in split(batch, 4)]
    online_big, target_big = train(big, 1, tmp_path / "big")
    online_acc, target_acc = train(micro, 4, tmp_path / "acc")
    for name in online_big:
        torch.testing.assert_close(online_acc[name], online_big[name], rtol=0, atol=1e-6, msg=name)
    for name in target_big:
        torch.testing.assert_close(target_acc[name], target_big[name], rtol=0, atol=1e-6, msg=name)
    torch.manual_seed(0)
    initial = build_method(tiny_config())[0].state_dict()
    assert any(not torch.equal(online_big[name], value) for name, value in initial.items())  # training moved them
