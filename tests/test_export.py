"""Export parity: timm (local-dir and pretrained_cfg_overlay), HF IJepaModel, ONNX, a CNN to timm."""
import json

import pytest
import torch
from safetensors.torch import load_file

from jepa.export import ExportError, cnn_tokens_from_timm, export_encoder, load_export
from jepa.reader import EncoderReadError, load_checkpoint_encoder

from eval_helpers import make_checkpoint

VIT = ("model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.patch_size=8", "data.img_size=32")


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit_run")
    make_checkpoint(out, *VIT, step=2, seed=3)
    make_checkpoint(out, *VIT, step=4, seed=5)  # the newest: what export must pick
    return out


def images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_checkpoint_loading_picks_newest_and_which(vit_run):
    target, _, ckpt = load_checkpoint_encoder(vit_run, "target")
    context, _, _ = load_checkpoint_encoder(vit_run, "context")
    assert ckpt.name == "checkpoint-00000004"
    want = load_file(str(ckpt / "target_encoder.safetensors"))
    assert torch.equal(target.state_dict()["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])
    online = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(context.state_dict()["norm.weight"], online["context_encoder.norm.weight"])
    with pytest.raises(EncoderReadError, match="does not exist"):
        load_checkpoint_encoder(vit_run / "nope")
    with pytest.raises(EncoderReadError, match="--which 'ema'"):
        load_checkpoint_encoder(vit_run, "ema")


def test_timm_export_parity(vit_run, tmp_path):
    import timm

    out = export_encoder(vit_run, "timm", tmp_path / "timm")
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    encoder, _, _ = load_checkpoint_encoder(vit_run)
    x = images()
    with torch.no_grad():
        want = encoder(x)
        local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert tuple(local.pretrained_cfg["input_size"]) == (3, 32, 32)  # a list on timm 1.0.29
        assert (local.forward_features(x) - want).abs().max() < 1e-5
        assert local(x).shape == (3, 64)
        assert (local(x) - want.mean(1)).abs().max() < 1e-5
        overlay = timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                                    pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                                custom_load=False),
                                    **config["model_args"]).eval()
        assert (overlay.forward_features(x) - want).abs().max() < 1e-5
    back, _, meta = load_export(out)  # an export is also an eval source
    assert meta["format"] == "timm"
    with torch.no_grad():
        assert (back(x) - want).abs().max() == 0


def test_hf_export_parity(vit_run, tmp_path):
    from transformers import IJepaModel

    out = export_encoder(vit_run, "hf", tmp_path / "hf", which="context")
    encoder, _, _ = load_checkpoint_encoder(vit_run, "context")
    model, info = IJepaModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = images(seed=1)
    with torch.no_grad():
        got = model.eval()(pixel_values=x).last_hidden_state
        want = encoder(x)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    back, _, _ = load_export(out)
    with torch.no_grad():
        assert (back(x) - want).abs().max() < 1e-6


def test_onnx_export_dynamic_batch(vit_run, tmp_path):
    import onnxruntime

    out = export_encoder(vit_run, "onnx", tmp_path / "onnx")
    assert json.loads((out / "export.json").read_text())["onnx_max_abs_diff"] < 1e-4
    session = onnxruntime.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    encoder, _, _ = load_checkpoint_encoder(vit_run)
    for batch in (1, 5):
        x = images(batch, seed=batch)
        (got,) = session.run(["tokens"], {"images": x.numpy()})
        with torch.no_grad():
            assert abs(torch.from_numpy(got) - encoder(x)).max() < 1e-4
    with pytest.raises(ExportError, match="ONNX is for deployment"):
        load_export(out)


def test_safetensors_export_strips_prefixes(vit_run, tmp_path):
    out = export_encoder(vit_run, "safetensors", tmp_path / "st", which="context")
    keys = load_file(str(out / "encoder.safetensors")).keys()
    assert "patch_embed.proj.weight" in keys and not any(k.startswith(("context_encoder.", "predictor.")) for k in keys)
    assert (out / "config.yaml").is_file()


def test_cnn_export_to_timm(tmp_path):
    import timm

    run = tmp_path / "cnn_run"
    make_checkpoint(run, "model.encoder=cnn:resnet10t", "model.depth=null", "model.embed_dim=null", "model.num_heads=null",
                    "data.img_size=64", seed=7)
    out = export_encoder(run, "timm", tmp_path / "cnn_timm")
    encoder, _, _ = load_checkpoint_encoder(run)
    x = images(2, 64, seed=2)
    with torch.no_grad():
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        got = cnn_tokens_from_timm(model.forward_features(x), load_file(str(out / "token_norm.safetensors")))
        assert (got - encoder(x)).abs().max() < 1e-5
    with pytest.raises(ExportError, match="needs a ViT encoder"):
        export_encoder(run, "hf", tmp_path / "cnn_hf")
