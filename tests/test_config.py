import pytest

from jepa.config import ConfigError, all_keys, load_config, to_yaml


def test_required_keys_exist():
    keys = all_keys()
    for key in ["trainer.max_steps", "trainer.output_dir", "trainer.seed", "data.root"]:
        assert key in keys


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_steps: 7\noptim:\n  lr: 1e-3\nmasks:\n  target_scale: [0.1, 0.2]\n")
    cfg = load_config(path, ["trainer.max_steps=9", "optim.lr=2e-3", "data.root=/x", "masks.context_scale=[0.8,1]"])
    assert cfg.trainer.max_steps == 9 and cfg.optim.lr == 2e-3 and cfg.data.root == "/x"
    assert cfg.masks.target_scale == (0.1, 0.2) and cfg.masks.context_scale == (0.8, 1.0)
    assert load_config(None, []).trainer.max_steps == 1000
    # the printed/saved config reads back to the same config
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    configs = [c for c in configs if not {"eval", "vljepa", "accelerate"} & set(c.parts)]  # those: own tests
    assert len(configs) >= 5
    for path in configs:
        load_config(path)


BAD = [
    (["trainer.max_step=5"], "unknown config key 'trainer.max_step'; closest valid keys: trainer.max_steps"),
    (["optim.lrr=1"], "closest valid keys: optim.lr"),
    (["nonsense.key=1"], "unknown config key 'nonsense.key'"),
    (["trainer.max_steps=ten"], "config key 'trainer.max_steps' expects an int, got 'ten'"),
    (["trainer.max_steps=1.5"], "config key 'trainer.max_steps' expects an int"),
    (["data.pin_memory=3"], "config key 'data.pin_memory' expects a bool"),
    (["masks.target_scale=0.2"], "config key 'masks.target_scale' expects a list of 2 values"),
    (["masks.equalize=cut"], "config key 'masks.equalize' is 'cut'; expected one of ['pad', 'truncate']"),
    (["loss.kind=huber"], "config key 'loss.kind' is 'huber'"),
    (["trainer.max_steps=0"], "config key 'trainer.max_steps' must be > 0"),
    (["masks.target_scale=[0.5,0.2]"], "config key 'masks.target_scale' must satisfy"),
    (["data.img_size=100", "model.patch_size=16"], "config key 'data.img_size' (100) must be divisible"),
    (["optim.ema_start=1.2"], "optim.ema_start"),
    (["trainer=5"], "config key 'trainer' is a section"),
    (["trainer.max_steps"], "override 'trainer.max_steps' is not of the form key=value"),
    (["optim.lr=0"], "config key 'optim.lr' must be > 0, got 0.0"),
    (["optim.betas=[1.5,0.9]"], "config key 'optim.betas' must be < 1"),
    (["monitor.knn_temperature=0"], "config key 'monitor.knn_temperature' must be > 0"),
    (["monitor.batch_size=0"], "config key 'monitor.batch_size' must be > 0"),
    (["predictor.dim=30", "predictor.num_heads=4"], "config key 'predictor.num_heads' (4) must divide predictor.dim"),
    (["model.num_heads=5"], "config key 'model.num_heads' (5) must divide the encoder width model.embed_dim (192, "),
    (["model.embed_dim=100"], "config key 'model.num_heads' (3) must divide the encoder width model.embed_dim (100)"),
    (["data.crop_scale=[0.3,"], "override 'data.crop_scale=[0.3,': the value is not valid YAML (line 1"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_config_values(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")
