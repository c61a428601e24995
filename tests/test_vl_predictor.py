"""VL predictor (shapes, padding, errors), the transformer backbone's causal / post-norm options, the hybrid's causal
option, and the MiniLM initialisation against Hugging Face's BertLayer."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from predictors.backbones import backbone_options, build_backbone
from predictors.minilm_init import check_minilm_compatible, init_from_minilm
from predictors.vl_predictor import VLPredictor

X_DIM, Y_DIM, DIM, VOCAB, MAX_LEN = 24, 16, 32, 50, 12
MAMBA = dict(d_state=16, headdim=16, chunk_size=16, kernel="reference")
BACKBONES = {
    "transformer": ("transformer", {}),
    "transformer_causal": ("transformer", {"causal": True}),
    "transformer_post": ("transformer", {"norm": "post", "norm_eps": 1e-12}),
    "mamba3": ("mamba3", MAMBA),
    "hybrid": ("hybrid", {"pattern": "MA", **MAMBA}),
    "hybrid_causal": ("hybrid", {"pattern": "MA", "causal": True, **MAMBA}),
}


def tiny(key="transformer", query_embedding="learned", **kwargs):
    backbone, options = BACKBONES[key]
    torch.manual_seed(0)
    query_dim = 20 if query_embedding == "y_encoder" else None
    return VLPredictor(X_DIM, Y_DIM, dim=DIM, depth=2, num_heads=4, backbone=backbone, vocab_size=VOCAB,
                       max_query_len=MAX_LEN, query_embedding=query_embedding, query_dim=query_dim,
                       **{**options, **kwargs}).eval()


def inputs(batch=2, visual=7, query_len=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, visual, X_DIM, generator=gen)
    ids = torch.randint(1, VOCAB, (batch, query_len), generator=gen)
    embeds = torch.randn(batch, query_len, 20, generator=gen)
    return x, ids, embeds


def call(model, x, ids, embeds, mask):
    if model.query_embedding == "learned":
        return model(x, ids, mask)
    return model(x, None, mask, query_embeds=embeds)


@pytest.mark.parametrize("key", list(BACKBONES))
@pytest.mark.parametrize("query_embedding", ["learned", "y_encoder"])
def test_output_shape_and_every_parameter_gets_a_gradient(key, query_embedding):
    model = tiny(key, query_embedding).train()
    x, ids, embeds = inputs()
    out = call(model, x, ids, embeds, torch.ones(2, 5, dtype=torch.long))
    assert out.shape == (2, Y_DIM)
    out.square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing  # DDP needs every parameter used


@pytest.mark.parametrize("key", ["transformer", "mamba3", "hybrid"])
def test_without_query_uses_visual_tokens_only(key):
    model = tiny(key, use_query=False)
    assert not any("query" in name for name, _ in model.named_parameters())
    x, ids, _ = inputs()
    out = model(x, None, None)
    assert out.shape == (2, Y_DIM)
    # the visual mean pooling by hand: norm(backbone(x_proj(x) + visual type)) averaged over tokens
    tokens = model.x_proj(x) + model.modality_embed[0]
    pos = torch.arange(7).expand(2, 7)
    expected = model.y_proj(model.norm(model.backbone(tokens, pos, None)).mean(1))
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="use_query=False but got query_ids"):
        model(x, ids, None)


@pytest.mark.parametrize("key", list(BACKBONES))
@pytest.mark.parametrize("query_embedding", ["learned", "y_encoder"])
def test_padding_query_tokens_change_nothing(key, query_embedding):
    """Each row alone, unpadded, equals that row inside a batch padded to a longer query with random pad tokens."""
    model = tiny(key, query_embedding)
    x, ids, embeds = inputs(query_len=9, seed=3)
    lengths = [4, 6]
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    with torch.no_grad():
        padded = call(model, x, ids, embeds, mask)
        for row, length in enumerate(lengths):
            alone = call(model, x[row:row + 1], ids[row:row + 1, :length], embeds[row:row + 1, :length], None)
            torch.testing.assert_close(padded[row:row + 1], alone, rtol=0, atol=1e-5)
        # and the query does matter: changing a real token changes the output
        ids2, embeds2 = ids.clone(), embeds.clone()
        ids2[:, 0] = (ids2[:, 0] + 1) % VOCAB
        embeds2[:, 0] += 1.0
        assert (call(model, x, ids2, embeds2, mask) - padded).abs().max() > 1e-4


def test_sequence_is_visual_then_query_with_arange_positions():
    """The predictor's output by hand: x_proj + type 0, then embed + learned positions + type 1, masked mean."""
    model = tiny("mamba3")
    x, ids, _ = inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(x, ids, mask)
        tokens = torch.cat([model.x_proj(x) + model.modality_embed[0],
                            model.query_embed(ids) + model.query_pos[:, :5] + model.modality_embed[1]], 1)
        pad = torch.cat([torch.zeros(2, 7, dtype=torch.bool), mask == 0], 1)
        hidden = model.norm(model.backbone(tokens, torch.arange(12).expand(2, 12), pad))
        keep = (~pad).float()[..., None]
        expected = model.y_proj((hidden * keep).sum(1) / keep.sum(1))
    torch.testing.assert_close(out, expected)


def test_bad_inputs_name_the_shape():
    model = tiny()
    x, ids, _ = inputs()
    with pytest.raises(ValueError, match=r"x_tokens has shape \(2, 7, 23\).*x_dim = 24"):
        model(x[..., :23], ids, None)
    with pytest.raises(ValueError, match="13 tokens, longer than max_query_len 12"):
        model(x, torch.zeros(2, 13, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"query_mask has shape \(2, 4\).*\(2, 5\)"):
        model(x, ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"query_ids has shape None"):
        model(x, None, None)
    with pytest.raises(ValueError, match="got query_embeds"):
        model(x, ids, None, query_embeds=torch.zeros(2, 5, 20))
    y_model = tiny(query_embedding="y_encoder")
    with pytest.raises(ValueError, match=r"query_embeds has shape \(2, 5, 19\).*query_dim = 20"):
        y_model(x, None, None, query_embeds=torch.zeros(2, 5, 19))
    with pytest.raises(ValueError, match=r"query_ids has shape \(2, 5\) but query_embeds has \(2, 4, 20\)"):
        y_model(x, ids, None, query_embeds=torch.zeros(2, 4, 20))
    embeds = torch.randn(2, 5, 20)
    torch.testing.assert_close(y_model(x, ids, None, query_embeds=embeds), y_model(x, None, None, query_embeds=embeds))
    with pytest.raises(ValueError, match="needs query_dim"):
        VLPredictor(X_DIM, Y_DIM, dim=DIM, depth=1, num_heads=4, query_embedding="y_encoder")
    with pytest.raises(ValueError, match="query_embedding 'clip' is unknown"):
        VLPredictor(X_DIM, Y_DIM, dim=DIM, depth=1, num_heads=4, query_embedding="clip")


# --- transformer backbone: options, default unchanged, causal, post-norm ---------------------------------------

def test_new_options_are_listed():
    assert {"causal", "norm", "norm_eps"} <= set(backbone_options("transformer"))
    assert "causal" in backbone_options("hybrid")
    assert "causal" not in backbone_options("mamba3")  # there it is bidirectional="forward"
    with pytest.raises(ValueError, match="transformer norm 'sandwich' is unknown"):
        build_backbone("transformer", DIM, 1, 4, norm="sandwich")


def test_default_transformer_is_the_timm_block_stack():
    torch.manual_seed(0)
    backbone = build_backbone("transformer", DIM, 2, 4).eval()
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(DIM, 4, qkv_bias=True) for _ in range(2)).eval()
    for (name, a), (_, b) in zip(backbone.blocks.state_dict().items(), blocks.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 6, DIM)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    expected = x
    for block in blocks:
        expected = block(expected, attn_mask=(~pad)[:, None, None, :])
    assert torch.equal(backbone(x, None, pad), expected)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_causal_transformer_output_depends_only_on_earlier_tokens(norm):
    torch.manual_seed(0)
    backbone = build_backbone("transformer", DIM, 2, 4, causal=True, norm=norm).eval()
    bidirectional = build_backbone("transformer", DIM, 2, 4, norm=norm).eval()
    bidirectional.load_state_dict(backbone.state_dict())
    x = torch.randn(2, 10, DIM)
    cut = 6
    x_changed = x.clone()
    x_changed[:, cut:] = torch.randn(2, 10 - cut, DIM)
    no_pad = torch.zeros(2, 10, dtype=torch.bool)
    with torch.no_grad():
        y = backbone(x)  # SDPA's is_causal path
        torch.testing.assert_close(backbone(x_changed)[:, :cut], y[:, :cut], rtol=0, atol=1e-6)
        assert (backbone(x_changed)[:, cut:] - y[:, cut:]).abs().max() > 1e-3
        torch.testing.assert_close(backbone(x, None, no_pad), y, rtol=0, atol=1e-6)  # the explicit-mask path
        assert (bidirectional(x_changed)[:, :cut] - bidirectional(x)[:, :cut]).abs().max() > 1e-3
        # with padding: token i sees real tokens j <= i only; prefix outputs equal the unpadded prefix run
        pad = torch.zeros(2, 10, dtype=torch.bool)
        pad[:, cut:] = True
        torch.testing.assert_close(backbone(x_changed, None, pad)[:, :cut], backbone(x[:, :cut]), rtol=0, atol=1e-5)
        # a padding token first (no real key before it) gives finite outputs, and real tokens ignore it
        left = torch.zeros(2, 10, dtype=torch.bool)
        left[:, 0] = True
        out = backbone(x, None, left)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, 1:], backbone(x[:, 1:]), rtol=0, atol=1e-5)


def test_causal_hybrid_scans_forward_and_depends_only_on_earlier_positions():
    torch.manual_seed(0)
    backbone = build_backbone("hybrid", DIM, 2, 4, pattern="MA", causal=True, **MAMBA).eval()
    assert backbone.blocks[0].mixer.bidirectional == "forward"
    x = torch.randn(2, 10, DIM)
    pos = torch.stack([torch.randperm(10), torch.randperm(10)])
    x_changed = x.clone()
    late = pos >= 6
    x_changed[late] = torch.randn(int(late.sum()), DIM)
    with torch.no_grad():
        y, y_changed = backbone(x, pos, None), backbone(x_changed, pos, None)
    torch.testing.assert_close(y_changed[~late], y[~late], rtol=0, atol=1e-5)
    assert (y_changed[late] - y[late]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="causal=True needs the Mamba-3 blocks to scan forward only, but "
                                         "bidirectional is 'split'"):
        build_backbone("hybrid", DIM, 2, 4, pattern="MA", causal=True, bidirectional="split", **MAMBA)
    build_backbone("hybrid", DIM, 2, 4, pattern="A", causal=True, bidirectional="split", **MAMBA)  # no Mamba block


def layer_norm_by_hand(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_post_norm_block_is_the_bert_formula():
    dim, heads, eps = 8, 2, 1e-5
    torch.manual_seed(0)
    backbone = build_backbone("transformer", dim, 1, heads, norm="post", norm_eps=eps, mlp_ratio=2.0).eval()
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    block = backbone.blocks[0]
    x = torch.randn(2, 5, dim)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    qkv = x @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = (t.reshape(2, 5, heads, dim // heads).transpose(1, 2) for t in qkv.split(dim, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim // heads)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, dim)
    attn = attn @ block.attn.proj.weight.T + block.attn.proj.bias
    h = layer_norm_by_hand(x + attn, block.norm1.weight, block.norm1.bias, eps)
    hidden = h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    mlp = hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    expected = layer_norm_by_hand(h + mlp, block.norm2.weight, block.norm2.bias, eps)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x, None, pad), expected, rtol=0, atol=1e-5)


# --- MiniLM initialisation -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    from predictors.minilm_init import load_minilm

    return load_minilm()


def minilm_predictor(depth, **kwargs):
    torch.manual_seed(0)
    return VLPredictor(X_DIM, 384, dim=384, depth=depth, num_heads=12, mlp_ratio=4.0, vocab_size=VOCAB,
                       max_query_len=MAX_LEN, norm="post", norm_eps=1e-12, **kwargs).eval()


@pytest.mark.parametrize("layers,depth,first", [("last", 3, 3), ("first", 2, 0), ("last", 6, 0)])
def test_minilm_init_copies_layers_and_reproduces_bert(minilm, layers, depth, first):
    predictor = minilm_predictor(depth)
    copied = init_from_minilm(predictor, layers=layers)
    assert len(copied) == 12 * depth
    params = dict(predictor.named_parameters())
    for j in range(depth):
        hf = minilm.encoder.layer[first + j]
        sa = hf.attention.self
        expect = {
            "attn.qkv.weight": torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
            "attn.qkv.bias": torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]),
            "attn.proj.weight": hf.attention.output.dense.weight, "attn.proj.bias": hf.attention.output.dense.bias,
            "norm1.weight": hf.attention.output.LayerNorm.weight, "norm1.bias": hf.attention.output.LayerNorm.bias,
            "mlp.fc1.weight": hf.intermediate.dense.weight, "mlp.fc1.bias": hf.intermediate.dense.bias,
            "mlp.fc2.weight": hf.output.dense.weight, "mlp.fc2.bias": hf.output.dense.bias,
            "norm2.weight": hf.output.LayerNorm.weight, "norm2.bias": hf.output.LayerNorm.bias,
        }
        for name, tensor in expect.items():
            assert f"backbone.blocks.{j}.{name}" in copied
            assert torch.equal(params[f"backbone.blocks.{j}.{name}"], tensor), (j, name)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 384, generator=gen)
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    extended = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min  # HF's extended attention mask
    with torch.no_grad():
        ours = predictor.backbone(x, None, mask == 0)
        theirs = x
        for j in range(depth):
            result = minilm.encoder.layer[first + j](theirs, attention_mask=extended)
            theirs = result[0] if isinstance(result, tuple) else result
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - x).abs().max() > 0.1  # the layers did something


def test_minilm_init_rejects_bad_configs():
    good = dict(backbone="transformer", dim=384, depth=6, num_heads=12, mlp_ratio=4.0, norm="post", norm_eps=1e-12)
    check_minilm_compatible(**good)
    for key, value in [("backbone", "mamba3"), ("dim", 256), ("depth", 7), ("depth", 0), ("num_heads", 8),
                       ("mlp_ratio", 2.0), ("norm", "pre"), ("norm_eps", 1e-6)]:
        with pytest.raises(ValueError, match=rf"predictor\.{key} is {value!r}" if isinstance(value, str)
                           else rf"predictor\.{key} is {value}"):
            check_minilm_compatible(**{**good, key: value})
    with pytest.raises(ValueError, match="predictor.gated_attention is True"):
        check_minilm_compatible(**good, gated_attention=True)
    with pytest.raises(ValueError, match="predictor.norm is 'pre'.*predictor.dim is 256"):
        check_minilm_compatible(**{**good, "norm": "pre", "dim": 256})
    # on a built predictor, before anything is loaded
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="needs predictor.backbone 'transformer' \\(got 'mamba3'\\)"):
        init_from_minilm(VLPredictor(X_DIM, Y_DIM, dim=DIM, depth=1, num_heads=4, backbone="mamba3", **MAMBA))
    with pytest.raises(ValueError, match="predictor.norm is 'pre'"):
        init_from_minilm(VLPredictor(X_DIM, Y_DIM, dim=384, depth=1, num_heads=12, norm_eps=1e-12))
    with pytest.raises(ValueError, match="MiniLM layers 'middle' is unknown"):
        init_from_minilm(minilm_predictor(1), layers="middle")
