import pytest
import torch

from encoders.registry import available_encoders, build_encoder
from encoders.vit_video import VIDEO_SIZES, VideoTransformer, rope_axis_dim
from jepa.export_vjepa2 import VJEPA2ExportError, from_vjepa2, to_vjepa2

POS = ("sincos", "rope")


def tiny_video(pos="sincos", embed_dim=48, num_heads=2, **kw):
    torch.manual_seed(0)
    return build_encoder("vit_video_tiny", patch_size=8, tubelet_size=2, depth=2, embed_dim=embed_dim,
                         num_heads=num_heads, pos=pos, **kw).eval()


def perturbed(encoder, scale=0.3):
    """Weights far from the init (sharp attention), so positions matter in every comparison."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return encoder


def clip(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pos", POS)
def test_all_indices_kept_equals_no_indices(pos):
    enc = perturbed(tiny_video(pos))
    video = clip(2, 3, 4, 16, 24)
    idx = torch.arange(2 * 2 * 3).expand(2, -1)
    torch.testing.assert_close(enc(video, idx), enc(video), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos", POS)
def test_padding_changes_no_real_token(pos):
    enc = perturbed(tiny_video(pos))
    video = clip(2, 3, 4, 32, 32)
    idx = torch.tensor([[0, 3, 5, 9, 1, 1], [1, 2, 4, 6, 7, 15]])  # padding of row 0 points at a real token
    pad = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    padded = enc(video, idx, pad)
    alone = enc(video[:1], idx[:1, :4])
    torch.testing.assert_close(padded[0, :4], alone[0], rtol=0, atol=1e-5)
    other = idx.clone()
    other[0, 4:] = torch.tensor([14, 2])  # other padding indices: same real outputs
    torch.testing.assert_close(enc(video, other, pad)[0, :4], padded[0, :4], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos", POS)
def test_kept_tokens_carry_their_positions(pos):
    # a kept token is embedded (and, with RoPE, rotated) at its own grid index, whatever its place in keep_idx
    enc = perturbed(build_encoder("vit_video_tiny", patch_size=8, depth=1, embed_dim=48, num_heads=2, pos=pos).eval())
    video = clip(1, 3, 4, 32, 32)
    idx = torch.tensor([[11, 2, 27]])
    grid_tokens, _ = enc.embed(video)
    kept, _ = enc.embed(video, idx)
    torch.testing.assert_close(kept, grid_tokens[:, [11, 2, 27]])
    shuffled = enc(video, idx[:, [2, 0, 1]])  # order of kept tokens does not matter: positions travel with them
    torch.testing.assert_close(shuffled, enc(video, idx)[:, [2, 0, 1]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("shape", [(2, 16, 16), (4, 32, 24), (8, 16, 40)])
def test_runs_at_other_sizes(pos, shape):
    enc = tiny_video(pos)
    frames, height, width = shape
    out = enc(clip(1, 3, frames, height, width))
    assert out.shape == (1, frames // 2 * height // 8 * width // 8, 48)
    assert torch.isfinite(out).all()


def test_token_grid_and_image_rule():
    enc = tiny_video("rope")
    assert enc.token_grid((3, 16, 32, 48)) == (8, 4, 6)
    assert enc.token_grid((3, 32, 48)) == (1, 4, 6)  # an image: one tubelet in time
    assert enc.token_grid((3, 1, 32, 48)) == (1, 4, 6)  # a one-frame clip: the same
    image = clip(2, 3, 32, 48)
    repeated = image.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # the image repeated to tubelet_size frames
    torch.testing.assert_close(enc(image), enc(repeated), rtol=0, atol=0)
    torch.testing.assert_close(enc(image.unsqueeze(2)), enc(repeated), rtol=0, atol=0)
    assert enc(image).shape == (2, 24, 48)


@pytest.mark.parametrize("shape, match", [
    ((1, 3, 3, 16, 16), r"\(3, 3, 16, 16\): 3 frames is not a multiple of the tubelet size 2"),
    ((1, 3, 4, 20, 16), r"\(3, 4, 20, 16\): size 20x16 is not divisible by patch size 8"),
    ((1, 3, 16, 12), r"\(3, 16, 12\): size 16x12 is not divisible by patch size 8"),
    ((3, 16, 16), r"\(3, 16, 16\) has rank 3"),
    ((1, 1, 3, 4, 16, 16), r"\(1, 1, 3, 4, 16, 16\) has rank 6"),
    ((1, 1, 4, 16, 16), r"\(1, 4, 16, 16\) has 1 channels \(expected 3\)"),
])
def test_bad_shapes_raise_naming_the_shape(shape, match):
    with pytest.raises(ValueError, match=match):
        tiny_video()(torch.zeros(shape))


def test_token_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(3, 5, 16, 16\): 5 frames"):
        tiny_video().token_grid((3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"\(16, 16\) has rank 2"):
        tiny_video().token_grid((16, 16))


def test_intermediate_layers():
    enc = tiny_video("rope")
    video = clip(1, 3, 4, 32, 32)
    layers = enc.intermediate_layers(video, 2, torch.tensor([[0, 5, 9]]))
    assert [tuple(x.shape) for x in layers] == [(1, 3, 48), (1, 3, 48)]
    torch.testing.assert_close(layers[-1], enc(video, torch.tensor([[0, 5, 9]])))
    with pytest.raises(ValueError, match="count 3 must be in"):
        enc.intermediate_layers(video, 3)


def test_registry_names_build():
    names = [f"vit_video_{size}" for size in VIDEO_SIZES]
    assert set(names) <= set(available_encoders())
    for name in names:
        for pos in POS:
            enc = build_encoder(name, patch_size=8, tubelet_size=4, depth=1, embed_dim=60, num_heads=2, pos=pos,
                                drop_path=0.1, qkv_bias=False)
            assert isinstance(enc, VideoTransformer) and enc.pos == pos and enc.embed_dim == 60
            assert enc.blocks[0].attn.qkv.bias is None and enc.patch_embed.proj.kernel_size == (4, 8, 8)
    with pytest.raises(ValueError, match="takes no option"):
        build_encoder("vit_video_small", img_size=224)
    with pytest.raises(ValueError, match="pos 'alibi' is unknown"):
        build_encoder("vit_video_small", depth=1, pos="alibi")


def test_named_sizes_and_sincos_width_not_multiple_of_six():
    large = build_encoder("vit_video_large", depth=1, pos="sincos").eval()  # D=1024: 1020 channels + 4 unplaced
    assert (large.embed_dim, large.num_heads) == (1024, 16)
    tokens, _ = large.embed(torch.zeros(1, 3, 2, 32, 32))
    assert tokens.shape == (1, 4, 1024) and torch.all(tokens[0, :, -4:] == large.patch_embed.proj.bias[-4:])
    assert rope_axis_dim(64) == 20  # ViT-L/H heads: 3 x 20 rotated channels, 4 not


@pytest.mark.parametrize("embed_dim, num_heads", [(48, 2), (64, 2)])  # head 24: all channels rotated; head 32: 2 not
def test_rope_export_matches_vjepa2_model(tmp_path, embed_dim, num_heads):
    from transformers import VJEPA2Model

    enc = perturbed(tiny_video("rope", embed_dim=embed_dim, num_heads=num_heads))
    info = to_vjepa2(enc, tmp_path, frames=4, img_size=32)
    assert info["vjepa2_max_abs_diff"] < 1e-4
    model = VJEPA2Model.from_pretrained(str(tmp_path)).eval()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.tubelet_size,
            cfg.frames_per_clip, cfg.crop_size, cfg.layer_norm_eps, cfg.mlp_ratio) == (
        embed_dim, 2, num_heads, 8, 2, 4, 32, 1e-6, 4.0)
    video = clip(2, 3, 6, 32, 32, seed=3)  # more frames than exported: RoPE time positions need no table
    with torch.no_grad():
        theirs = model(pixel_values_videos=video.transpose(1, 2)).last_hidden_state  # HF: (B, T, C, H, W)
        ours = enc(video)
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape == (2, 3 * 16, embed_dim)
    diff = (theirs - ours).abs().max().item()
    assert diff < 1e-4, diff

    # kept tokens: our keep_idx forward == VJEPA2's layers on the gathered tokens with position_mask
    idx = torch.tensor([[0, 5, 17, 40], [3, 4, 30, 47]])
    with torch.no_grad():
        hidden = model.encoder.embeddings(video.transpose(1, 2))
        hidden = torch.gather(hidden, 1, idx.unsqueeze(-1).expand(-1, -1, embed_dim))
        for layer in model.encoder.layer:
            hidden = layer(hidden, idx)[0]
        theirs_kept = model.encoder.layernorm(hidden)
        ours_kept = enc(video, idx)
    assert (theirs_kept - ours_kept).abs().max().item() < 1e-4

    # the inverse mapping gives back our state dict exactly
    back = from_vjepa2(tmp_path)
    assert back.keys() == enc.state_dict().keys()
    for key, value in enc.state_dict().items():
        assert torch.equal(back[key], value), key


def test_export_placeholder_predictor_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    enc = tiny_video("rope")
    state = torch.random.get_rng_state()
    to_vjepa2(enc, tmp_path / "a", frames=2, img_size=16, check=False)
    to_vjepa2(enc, tmp_path / "b", frames=2, img_size=16, check=False)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("predictor.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sincos_encoder_cannot_export(tmp_path):
    with pytest.raises(VJEPA2ExportError, match="no additive position table"):
        to_vjepa2(tiny_video("sincos"), tmp_path, frames=4, img_size=32)
    with pytest.raises(VJEPA2ExportError, match="frames 3 is not a positive multiple of the tubelet size 2"):
        to_vjepa2(tiny_video("rope"), tmp_path, frames=3, img_size=32)
    with pytest.raises(VJEPA2ExportError, match="needs a video ViT"):
        to_vjepa2(build_encoder("vit_tiny", depth=1), tmp_path, frames=4, img_size=32)
