"""mamba3 and hybrid backbones: order, padding, reversal symmetry, patterns, options, errors."""
import pytest
import torch

from predictors.backbones import available_backbones, backbone_options, build_backbone

DIM = 32
SMALL = dict(d_state=16, headdim=16, chunk_size=16)


def small(name, depth=2, **kwargs):
    torch.manual_seed(0)
    return build_backbone(name, DIM, depth, 4, **{**SMALL, **kwargs}).eval()


def random_tokens(batch=2, length=21, grid=50, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, DIM, generator=gen)
    pos = torch.stack([torch.randperm(grid, generator=gen)[:length] for _ in range(batch)])
    return x, pos


def test_registered():
    assert {"mamba3", "hybrid", "transformer"} <= set(available_backbones())


@pytest.mark.parametrize("name,kwargs", [("mamba3", {}), ("mamba3", {"bidirectional": "shared"}),
                                         ("mamba3", {"bidirectional": "split"}),
                                         ("mamba3", {"mimo_rank": 2}), ("hybrid", {"pattern": "MA"})])
def test_input_order_does_not_matter(name, kwargs):
    model = small(name, **kwargs)
    x, pos = random_tokens()
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x, pos, None)
        y_perm = model(x[:, perm], pos[:, perm], None)
    assert y.shape == x.shape
    torch.testing.assert_close(y_perm, y[:, perm], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", [("mamba3", {}), ("mamba3", {"bidirectional": "forward"}),
                                         ("mamba3", {"bidirectional": "split"}),
                                         ("mamba3", {"bidirectional": "split", "mimo_rank": 2}),
                                         ("hybrid", {"pattern": "AM"})])
def test_padding_changes_no_real_output(name, kwargs):
    model = small(name, **kwargs)
    x, pos = random_tokens()
    batch, length, _ = x.shape
    gen = torch.Generator().manual_seed(3)
    extra = 7
    x_pad = torch.cat([x, 10 * torch.randn(batch, extra, DIM, generator=gen)], dim=1)
    pos_pad = torch.cat([pos, torch.randint(0, 50, (batch, extra), generator=gen)], dim=1)  # garbage positions too
    mask = torch.zeros(batch, length + extra, dtype=torch.bool)
    mask[:, length:] = True
    mask[1, length - 4:] = True  # a second row with fewer real tokens
    with torch.no_grad():
        y = model(x, pos, None)
        y_short = model(x[1:, : length - 4], pos[1:, : length - 4], None)
        y_pad = model(x_pad, pos_pad, mask)
    torch.testing.assert_close(y_pad[0, :length], y[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(y_pad[1, : length - 4], y_short[0], rtol=0, atol=1e-5)


def test_symmetric_combination_is_reversal_equivariant():
    """With shared directions, reversing the raster order (pos -> max - pos) leaves each token's output unchanged."""
    model = small("mamba3", bidirectional="shared")
    x, pos = random_tokens()
    with torch.no_grad():
        y = model(x, pos, None)
        y_reversed = model(x, 49 - pos, None)
    torch.testing.assert_close(y_reversed, y, rtol=0, atol=1e-5)
    separate = small("mamba3", bidirectional="separate")
    with torch.no_grad():
        assert (separate(x, 49 - pos, None) - separate(x, pos, None)).abs().max() > 1e-3


def test_forward_direction_is_causal_in_raster_order():
    model = small("mamba3", bidirectional="forward")
    x, _ = random_tokens(batch=1, length=20)
    pos = torch.arange(20)[None]
    x_changed = x.clone()
    x_changed[:, 15:] += 1.0
    with torch.no_grad():
        y, y_changed = model(x, pos, None), model(x_changed, pos, None)
    torch.testing.assert_close(y_changed[:, :15], y[:, :15], rtol=0, atol=1e-6)
    assert (y_changed[:, 15:] - y[:, 15:]).abs().max() > 1e-3


@pytest.mark.parametrize("mimo_rank", [1, 2])
def test_split_heads_scan_left_to_right_and_right_to_left(mimo_rank):
    """``split``: the first half of the heads only sees tokens up to t, the second half only tokens from t on."""
    from predictors.backbones.mamba3 import Mamba3Mixer

    torch.manual_seed(0)
    mixer = Mamba3Mixer(DIM, bidirectional="split", mimo_rank=mimo_rank, **SMALL).eval()
    mixer.out_proj = torch.nn.Identity()  # keep the per-head channels: (B, L, H * P), heads in order
    half = mixer.heads // 2 * mixer.headdim
    x = torch.randn(1, 20, DIM)
    late, early = x.clone(), x.clone()
    late[:, 15:] += 1.0
    early[:, :5] += 1.0
    with torch.no_grad():
        y, y_late, y_early = mixer(x), mixer(late), mixer(early)
    torch.testing.assert_close(y_late[:, :15, :half], y[:, :15, :half], rtol=0, atol=1e-6)
    assert (y_late[:, :15, half:] - y[:, :15, half:]).abs().max() > 1e-3
    torch.testing.assert_close(y_early[:, 5:, half:], y[:, 5:, half:], rtol=0, atol=1e-6)
    assert (y_early[:, 5:, :half] - y[:, 5:, :half]).abs().max() > 1e-3


def test_gradients_reach_every_parameter():
    model = small("hybrid", depth=2, pattern="MA").train()
    x, pos = random_tokens()
    model(x, pos, None).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_hybrid_pattern_expands_to_depth():
    model = small("hybrid", depth=6, pattern="MMA")
    assert model.pattern == "MMAMMA"


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("hybrid", {"pattern": "MMXA"}, "'X'"),
        ("hybrid", {"pattern": ""}, "empty"),
        ("mamba3", {"headdim": 24}, "headdim 24"),
        ("mamba3", {"bidirectional": "both"}, "'both'"),
        ("mamba3", {"bidirectional": "split", "expand": 1, "headdim": 32}, "even number of heads"),
        ("mamba3", {"d_state": 10}, "d_state 10"),
        ("mamba3", {"ngroups": 3}, "ngroups 3"),
        ("mamba3", {"a_init": 0.0}, "a_init 0.0"),
        ("mamba3", {"kernel": "cuda"}, "kernel 'cuda'"),
    ],
)
def test_bad_options_raise_value_error(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(name, DIM, 2, 4, **{**SMALL, **kwargs})


@pytest.mark.parametrize("name,options,message", [
    ("transformer", {"d_state": 16}, "predictor backbone 'transformer' takes no option 'd_state' "
                                     "(its options: mlp_ratio, qkv_bias, drop_path, gated_attention, causal, norm, "
                                     "norm_eps, checkpoint_blocks)"),
    ("mamba3", {"pattern": "MA", "gated_attention": True}, "predictor backbone 'mamba3' takes no options 'pattern', "
                                                           "'gated_attention' (its options: mlp_ratio, drop_path, "),
    ("hybrid", {"d_sate": 16}, "predictor backbone 'hybrid' takes no option 'd_sate' (its options: pattern, "),
])
def test_unknown_option_raises_value_error_naming_it(name, options, message):
    with pytest.raises(ValueError) as error:
        build_backbone(name, DIM, 2, 4, **options)
    assert str(error.value).startswith(message), str(error.value)


def test_backbone_options_are_what_each_builder_takes():
    assert backbone_options("transformer") == ("mlp_ratio", "qkv_bias", "drop_path", "gated_attention", "causal",
                                              "norm", "norm_eps", "checkpoint_blocks")
    mixer = {"d_state", "expand", "headdim", "ngroups", "mimo_rank", "use_rotation", "bidirectional", "chunk_size",
             "dt_min", "dt_max", "a_floor", "a_init", "kernel", "scan_settings"}
    assert set(backbone_options("mamba3")) == {"mlp_ratio", "drop_path"} | mixer
    assert set(backbone_options("hybrid")) == {"pattern", "mlp_ratio", "drop_path", "gated_attention",
                                               "qkv_bias", "causal"} | mixer
    section = dict(SMALL, pattern="MA", gated_attention=False, qkv_bias=True, mlp_ratio=2.0, drop_path=0.1)
    for name in available_backbones():  # a config section holding every option: pass the chosen backbone's only
        build_backbone(name, DIM, 2, 4, **{k: v for k, v in section.items() if k in backbone_options(name)})
    with pytest.raises(ValueError, match="predictor.backbone 'rnn' is unknown"):
        backbone_options("rnn")


def test_triton_kernel_needs_sizes_the_op_takes():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="kernel 'triton' takes mimo_rank 1"):
        small("mamba3", mimo_rank=2, kernel="triton")
    with pytest.raises(ValueError, match="d_state=12"):
        small("mamba3", d_state=12, kernel="triton")
