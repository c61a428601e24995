import pytest
import torch

from encoders.registry import build_encoder
from predictors.ijepa import JEPAPredictor


def tiny_vit(**kw):
    return build_encoder("vit_tiny", patch_size=8, depth=2, embed_dim=64, num_heads=2, **kw).eval()


def test_all_indices_kept_equals_no_indices():
    vit = tiny_vit()
    images = torch.randn(3, 3, 32, 48)
    idx = torch.arange(4 * 6).expand(3, -1)
    torch.testing.assert_close(vit(images, idx), vit(images), rtol=0, atol=1e-6)


def test_kept_subset_with_padding_matches_unpadded():
    vit = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    idx = torch.tensor([[0, 3, 5, 9, 0, 0], [1, 2, 4, 8, 13, 15]])
    pad = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    padded = vit(images, idx, pad)
    alone = vit(images[:1], idx[:1, :4])
    torch.testing.assert_close(padded[0, :4], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (48, 80), (96, 64)])
def test_vit_runs_at_other_resolutions(size):
    out = tiny_vit()(torch.randn(1, 3, *size))
    assert out.shape == (1, size[0] // 8 * size[1] // 8, 64)


def test_vit_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible by patch size 8"):
        tiny_vit()(torch.randn(1, 3, 30, 32))


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="model.encoder 'vit_mega'"):
        build_encoder("vit_mega")


def test_cnn_encoder_blanks_hidden_patches():
    cnn = build_encoder("cnn:resnet18").eval()
    assert cnn.patch_size == 32
    images = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[0, 1], [0, 1]])
    out = cnn(images, keep)
    assert out.shape == (2, 2, cnn.embed_dim)
    changed = images.clone()
    changed[:, :, 32:, :] = 5.0  # bottom row of patches (2, 3) is hidden: the output must not move
    torch.testing.assert_close(cnn(changed, keep), out)
    changed[:, :, :32, :32] = 5.0  # a kept patch changes: the output moves
    assert not torch.allclose(cnn(changed, keep), out)


def test_predictor_shapes_and_padding_invariance():
    torch.manual_seed(0)
    pred = JEPAPredictor(64, pred_dim=32, depth=2, num_heads=2).eval()
    ctx = torch.randn(2, 5, 64)
    ctx_idx = torch.tensor([[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]])
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    tgt = torch.tensor([[[5, 6], [9, 10]], [[5, 6], [7, 8]]])
    out = pred(ctx, ctx_idx, pad, tgt, (4, 4))
    assert out.shape == (2, 2, 2, 64)
    alone = pred(ctx[:1, :3], ctx_idx[:1, :3], None, tgt[:1], (4, 4))
    torch.testing.assert_close(out[:1], alone, rtol=0, atol=1e-5)
