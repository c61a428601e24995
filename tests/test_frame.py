"""The frame: a method added as one file trains through train.py; registries and typed config rules."""
import pytest
import torch
from safetensors.torch import load_file

import toy_method  # noqa: F401  (registers the toy method, as a method file does on import)
import train
from encoders.pos_embed import sincos_table
from encoders.registry import available_encoders, build_encoder
from jepa.config import ConfigError, load_config
from jepa.methods import available_methods
from jepa.reader import load_checkpoint_encoder

from conftest import TINY

TOY = [o for o in TINY if not o.startswith("predictor.")] + ["method=toy_two_view", "head.hidden=16"]


def test_a_new_method_file_trains_through_train_py(imagenette_small, tmp_path, capsys):
    assert "toy_two_view" in available_methods()
    train.main(TOY + [f"data.root={imagenette_small}", f"trainer.output_dir={tmp_path}", "trainer.max_steps=3",
                      "trainer.checkpoint_every=3", "monitor.knn_every=0"])
    out = capsys.readouterr().out
    assert "method: toy_two_view" in out and "kNN accuracy (k=20): random init" in out
    ckpt = tmp_path / "checkpoint-00000003"
    teacher = load_file(str(ckpt / "teacher.safetensors"))  # its teacher, saved under its own name
    online = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("head.") for k in online)
    # the EMA teacher moved towards the trained online encoder, and eval/export find it through the method
    encoder, cfg, _ = load_checkpoint_encoder(tmp_path)
    assert cfg.method == "toy_two_view" and torch.equal(encoder.state_dict()["norm.weight"], teacher["norm.weight"])
    online_encoder, _, _ = load_checkpoint_encoder(tmp_path, "online")
    assert torch.equal(online_encoder.state_dict()["norm.weight"], online["encoder.norm.weight"])
    # the I-JEPA keys do not exist in this method's schema
    with pytest.raises(ConfigError, match="unknown config key 'predictor.depth'"):
        load_config(None, TOY + ["predictor.depth=2"])


BAD = [
    (["method=ijepa2"], "config key 'method' is 'ijepa2'; expected one of the registered methods"),
    (["predictor.d_state=7"], "config key 'predictor.d_state' must be a multiple of 4, got 7"),  # transformer too
    (["predictor.bidirectional=splitt"], "config key 'predictor.bidirectional' is 'splitt'; expected one of"),
    (["predictor.pattern=MXA"], "config key 'predictor.pattern' is 'MXA'"),
    (["predictor.num_heads=5"], "config key 'predictor.num_heads' (5) must divide predictor.dim"),
    (["model.encoder=cnn:resnet18", "model.depth=3"], "config key 'model.depth' is set but a CNN encoder"),
    (["model.img_size=64"], "unknown config key 'model.img_size'"),
    (["optim.betas=[0.9,1.5]"], "config key 'optim.betas' must be < 1"),
    (["model.drop_path=-0.1"], "config key 'model.drop_path' must be >= 0"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_typed_rules_are_checked_whatever_the_backbone(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_encoder_registry_and_protocol():
    assert "vit_tiny" in available_encoders() and "cnn:<name>" in available_encoders()
    vit = build_encoder("vit_tiny", patch_size=8, depth=3, embed_dim=48, num_heads=2).eval()
    images = torch.randn(2, 3, 24, 40)
    assert vit.token_grid(images.shape[1:]) == (3, 5)
    layers = vit.intermediate_layers(images, 2)
    assert len(layers) == 2 and all(layer.shape == (2, 15, 48) for layer in layers)
    torch.testing.assert_close(layers[-1], vit(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"encoder 'vit_tiny' takes no option\(s\) \['d_state'\]"):
        build_encoder("vit_tiny", d_state=16)
    with pytest.raises(ValueError, match="model.encoder 'vit_mega' is unknown"):
        build_encoder("vit_mega")


def test_sincos_any_rank_is_cached_on_its_device():
    table = sincos_table(48, (2, 3, 4))
    assert table.shape == (24, 48) and sincos_table(48, (2, 3, 4)) is table
    # each axis owns a block of dim / rank channels: moving along time changes only the first block
    t0, t1 = table[0], table[12]
    assert torch.equal(t0[16:], t1[16:]) and not torch.equal(t0[:16], t1[:16])
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_table(32, (2, 3, 4))
