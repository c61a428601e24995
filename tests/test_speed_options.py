"""Speed options give the plain path's numbers: the patch embedding as one GEMM, activation checkpointing, and
attention left unmasked when the host knows nothing is padded."""
import dataclasses

import pytest
import torch

from encoders.layers import patchify_linear
from jepa.config import load_config
from jepa.masks import MultiBlockMaskSampler
from jepa.methods import build_method
from data.batch import Batch


@pytest.mark.parametrize("conv,shape", [
    (torch.nn.Conv2d(3, 16, 4, 4), (2, 3, 8, 12)),
    (torch.nn.Conv3d(3, 16, (2, 4, 4), (2, 4, 4)), (2, 3, 4, 8, 12)),
])
def test_patchify_linear_equals_the_convolution(conv, shape):
    x = torch.randn(shape)
    torch.testing.assert_close(patchify_linear(x, conv), conv(x).flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_patchify_linear_names_an_indivisible_size():
    with pytest.raises(ValueError, match="8x10 is not divisible by the patch 4x4"):
        patchify_linear(torch.randn(1, 3, 8, 10), torch.nn.Conv2d(3, 8, 4, 4))


def _tiny_ijepa(*overrides):
    cfg = load_config(None, ["model.encoder=vit_tiny", "model.depth=2", "model.embed_dim=32", "model.num_heads=4",
                             "model.patch_size=4", "data.img_size=32", "predictor.depth=2", "predictor.dim=32",
                             "predictor.num_heads=4", *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg)


def _batch(cfg, parts, equalize="pad", seed=0):
    sampler = MultiBlockMaskSampler(parts.token_grid, num_targets=4, target_scale=(0.15, 0.2),
                                    target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), min_keep=4,
                                    equalize=equalize)
    torch.manual_seed(seed)
    return Batch(pixels=torch.randn(4, 3, cfg.data.img_size, cfg.data.img_size), masks=[sampler(4, (seed,))])


def _loss_and_grads(parts, batch):
    out = parts.model(batch, {name: t.module for name, t in parts.teachers.items()})
    parts.model.zero_grad()
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in parts.model.parameters() if p.grad is not None]


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputation (of some blocks, of all) changes neither the loss nor any gradient."""
    cfg, plain = _tiny_ijepa()
    _, checkpointed = _tiny_ijepa("model.checkpoint_blocks=1", "predictor.checkpoint_blocks=5")  # some / all
    checkpointed.model.load_state_dict(plain.model.state_dict())
    assert checkpointed.model.context_encoder.checkpoint_blocks == 1
    assert checkpointed.model.predictor.backbone.checkpoint_blocks == 5
    batch = _batch(cfg, plain)
    loss_a, grads_a = _loss_and_grads(plain, batch)
    loss_b, grads_b = _loss_and_grads(checkpointed, batch)
    torch.testing.assert_close(loss_a, loss_b)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_sampler_tells_whether_anything_is_padded():
    cfg, parts = _tiny_ijepa()
    truncated = _batch(cfg, parts, "truncate").masks[0]
    assert not truncated.context_padded and truncated.context_attention_pad is None
    padded = [_batch(cfg, parts, "pad", seed).masks[0] for seed in range(6)]
    for masks in padded:
        assert masks.context_padded == bool(masks.context_pad.any())
        assert (masks.context_attention_pad is None) == (not masks.context_padded)
    assert any(m.context_padded for m in padded)


def test_unmasked_attention_gives_the_masked_loss():
    """Truncated masks pad nothing: the step that leaves attention unmasked equals the one given the all-False mask."""
    cfg, parts = _tiny_ijepa()
    batch = _batch(cfg, parts, "truncate")
    forced = dataclasses.replace(batch, masks=[dataclasses.replace(batch.masks[0], context_padded=True)])
    loss_a, grads_a = _loss_and_grads(parts, batch)
    loss_b, grads_b = _loss_and_grads(parts, forced)
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
