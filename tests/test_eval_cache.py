"""Feature cache: same encoder + data reuses the entry; changed weights, data or transform recompute."""
import os

import pytest
import torch
from accelerate import Accelerator

from eval.encoders import EncoderSpecError, load_frozen_encoder
from eval.features import build_dataset, extract_features

from conftest import make_subset
from eval_helpers import make_checkpoint

VIT = ("model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8", "data.img_size=32")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("tiny_data"), 2, 1, classes=3)


def extract(encoder, root, cache, mode="pooled", img_size=32, layers=1):
    dataset = build_dataset(root, "train", img_size)
    return extract_features(encoder, dataset, mode, Accelerator(cpu=True), layers=layers, batch_size=4,
                            num_workers=0, cache_dir=cache, progress=False)


def test_hit_and_miss(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    make_checkpoint(tmp_path / "run", *VIT, step=2, seed=0)
    encoder = load_frozen_encoder(str(tmp_path / "run"))
    first = extract(encoder, tiny_data, cache)
    assert not first.cached and first.features.shape == (6, 32) and first.labels.tolist() == [0, 0, 1, 1, 2, 2]
    again = extract(load_frozen_encoder(str(tmp_path / "run")), tiny_data, cache)
    assert again.cached and again.key == first.key and torch.equal(again.features, first.features)

    make_checkpoint(tmp_path / "run", *VIT, step=4, seed=1)  # newer checkpoint, other weights
    changed = extract(load_frozen_encoder(str(tmp_path / "run")), tiny_data, cache)
    assert not changed.cached and changed.key != first.key
    assert not torch.allclose(changed.features, first.features)

    context = extract(load_frozen_encoder(str(tmp_path / "run"), which="context"), tiny_data, cache)
    assert not context.cached and context.key != changed.key

    resized = extract(load_frozen_encoder(str(tmp_path / "run")), tiny_data, cache, img_size=40)
    assert not resized.cached and resized.key != changed.key

    layers = extract(load_frozen_encoder(str(tmp_path / "run")), tiny_data, cache, layers=1, mode="tokens")
    assert not layers.cached and layers.features.shape == (6, 16, 32) and layers.features.dtype == torch.float16


def test_data_change_recomputes(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    encoder = load_frozen_encoder("timm:resnet10t", img_size=32)
    data = make_subset(tmp_path / "data", 2, 1, classes=2)
    first = extract(encoder, data, cache)
    assert extract(encoder, data, cache).cached
    extra = data / "train" / sorted(os.listdir(data / "train"))[0] / "extra.JPEG"
    extra.symlink_to(sorted((tiny_data / "train").rglob("*.JPEG"))[-1])
    grown = extract(encoder, data, cache)
    assert not grown.cached and len(grown.labels) == len(first.labels) + 1


def test_layers_concatenate(tiny_data, tmp_path):
    make_checkpoint(tmp_path / "run", *VIT, "model.depth=3", seed=0)
    encoder = load_frozen_encoder(str(tmp_path / "run"))
    two = extract(encoder, tiny_data, tmp_path / "cache", layers=2)
    last = extract(encoder, tiny_data, tmp_path / "cache", layers=1)
    assert two.features.shape == (6, 64) and torch.allclose(two.features[:, 32:], last.features, atol=1e-6)
    timm_cnn = load_frozen_encoder("timm:resnet10t", img_size=32)
    assert extract(timm_cnn, tiny_data, tmp_path / "cache", layers=2).features.shape[1] == 512 + 256
    tokens_two = extract(encoder, tiny_data, tmp_path / "cache", layers=2, mode="tokens")
    tokens_last = extract(encoder, tiny_data, tmp_path / "cache", layers=1, mode="tokens")
    assert tokens_two.features.shape == (6, 16, 64) and tokens_two.key != tokens_last.key
    assert torch.equal(tokens_two.features[..., 32:], tokens_last.features)
    with pytest.raises(ValueError, match="one token count per layer"):
        extract(timm_cnn, tiny_data, tmp_path / "cache", layers=2, mode="tokens")


def test_bad_encoder_values(tmp_path):
    with pytest.raises(EncoderSpecError, match="'timm:no_such_net' is not a timm model"):
        load_frozen_encoder("timm:no_such_net")
    with pytest.raises(EncoderSpecError, match="'/nowhere/run' is neither an existing folder"):
        load_frozen_encoder("/nowhere/run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderSpecError, match="holds no checkpoint"):
        load_frozen_encoder(str(tmp_path / "empty"))
    broken = make_checkpoint(tmp_path / "broken", *VIT)
    (broken / "target_encoder.safetensors").unlink()
    with pytest.raises(EncoderSpecError, match="missing weights file .*checkpoint-00000004/target_encoder"):
        load_frozen_encoder(str(tmp_path / "broken"))
