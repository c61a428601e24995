"""The token cache (build, reuse, rebuild, corrupt rows, bf16 storage, rank 0 builds) and the vl_pairs pipeline with
and without it: cached tokens equal the encoder applied to the uncached batch's normalised pixels."""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from data.batch import Batch
from data.folder import CorruptImageError, load_rgb_uint8
from data.loaders import build_pretrain_loader
from data.token_cache import TokenCache, fixed_view_transform
from data.transforms import DeviceNormalize
from data.vl_sources import flickr_source
from gloo_group import gloo_group
from jepa.methods import MethodParts

from test_vl_data import FLICKR, FakeTokenizer, make_flickr_copy


class Patchify(nn.Module):
    """(B, 3, 32, 32) -> (B, 16, 8) tokens: an 8x8-patch convolution; counts its forward calls."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.proj(x).flatten(2).transpose(1, 2)


def vl_cfg(root, split_file, out, **data):
    fields = dict(source="flickr", root=str(root), split_file=str(split_file), caption_query="describe the image",
                  max_query_len=8, max_target_len=16, img_size=32, crop_scale=(0.3, 1.0), hflip=False, augment=False,
                  batch_size=3, num_workers=0, pin_memory=False, on_corrupt="skip", cache_tokens=False,
                  token_cache_dir=str(out / "cache"), cache_dtype="fp32", decode="cpu")
    return SimpleNamespace(method="vljepa", data=SimpleNamespace(**{**fields, **data}),
                           trainer=SimpleNamespace(seed=0, output_dir=str(out)))


def vl_parts(encoder):
    return MethodParts(model=nn.Identity(), teachers={}, monitor_encoder=None, token_grid=(),
                       tokenizer=FakeTokenizer(), input_encoder=encoder)


@pytest.fixture
def flickr_small(tmp_path):
    """7 real images + broken.jpg, all in train."""
    return make_flickr_copy(tmp_path / "flickr", 7, sizes={"train": 8, "val": 0, "test": 0}, corrupt=True)


@pytest.mark.parametrize("dtype, workers", [("fp32", 0), ("bf16", 1)])
def test_pipeline_cached_tokens_equal_encoder_on_uncached_pixels(flickr_small, tmp_path, dtype, workers):
    root, split_file = flickr_small
    encoder = Patchify()
    plain = vl_cfg(root, split_file, tmp_path, num_workers=workers)
    cached = vl_cfg(root, split_file, tmp_path, num_workers=workers, cache_tokens=True, cache_dtype=dtype)
    loader, sampler = build_pretrain_loader("vl_pairs", plain, vl_parts(encoder))
    uncached_batches = list(loader)
    loader, cached_sampler = build_pretrain_loader("vl_pairs", cached, vl_parts(encoder))
    cached_batches = list(loader)
    assert len(sampler) == len(cached_sampler) == len(uncached_batches) == len(cached_batches) == 8 // 3
    skipped = 0
    for plain_batch, cached_batch in zip(uncached_batches, cached_batches):
        assert cached_batch.pixels is None and plain_batch.tokens is None
        assert plain_batch.pixels.dtype == torch.uint8 and plain_batch.pixels.shape[1:] == (3, 32, 32)
        assert torch.equal(plain_batch.labels, cached_batch.labels)
        assert torch.equal(plain_batch.skipped, cached_batch.skipped)
        for role in ("query", "target"):
            assert torch.equal(plain_batch.text[role]["input_ids"], cached_batch.text[role]["input_ids"])
        with torch.no_grad():
            reference = encoder(DeviceNormalize()(plain_batch).pixels)
        tokens = cached_batch.tokens
        assert tokens.shape == reference.shape == (len(plain_batch), 16, 8)
        if dtype == "fp32":
            assert tokens.dtype == torch.float32
            torch.testing.assert_close(tokens, reference, rtol=0, atol=1e-6)
        else:
            assert tokens.dtype == torch.bfloat16
            torch.testing.assert_close(tokens.float(), reference, rtol=2 ** -8, atol=1e-6)  # bf16: 8-bit mantissa
            assert (tokens.float() - reference).abs().max() > 0  # it really is rounded
        skipped += int(cached_batch.skipped)
    cache = TokenCache.open(tmp_path / "cache", next((tmp_path / "cache").glob("*.json")).stem)
    broken = [p.name for p in flickr_source(root, "train", split_file).images].index("broken.jpg")
    assert cache.missing == {broken} and not cache[broken].any()
    # the broken image is skipped by the dataset whenever the sampler puts it into a kept batch
    order = [key[0] for batch in cached_sampler for key in batch]
    assert skipped == int(broken in order)


def test_pipeline_cache_requirements(flickr_small, tmp_path):
    root, split_file = flickr_small
    cfg = vl_cfg(root, split_file, tmp_path, cache_tokens=True)
    with pytest.raises(ValueError, match=r"data.cache_tokens=true needs the method's input encoder .*X-encoder must "
                                         r"be frozen"):
        build_pretrain_loader("vl_pairs", cfg, vl_parts(None))
    cfg = vl_cfg(root, split_file, tmp_path, cache_tokens=True, augment=True)
    with pytest.raises(ValueError, match=r"needs data.augment=false: cached tokens are of the fixed view"):
        build_pretrain_loader("vl_pairs", cfg, vl_parts(Patchify()))
    parts = vl_parts(Patchify())
    parts.tokenizer = None
    with pytest.raises(ValueError, match=r"'vl_pairs' needs the method's tokenizer"):
        build_pretrain_loader("vl_pairs", vl_cfg(root, split_file, tmp_path), parts)
    # augment=True without the cache: random-resized crops, still (B, 3, 32, 32) uint8
    loader, _ = build_pretrain_loader("vl_pairs", vl_cfg(root, split_file, tmp_path, augment=True, hflip=True),
                                      vl_parts(None))
    batch = next(iter(loader))
    assert batch.pixels.shape[1:] == (3, 32, 32) and batch.pixels.dtype == torch.uint8


@pytest.fixture
def images(tmp_path):
    """Paths of 5 real Flickr images, copied (so their mtimes may change)."""
    (tmp_path / "imgs").mkdir()
    out = []
    for name in sorted(os.listdir(FLICKR / "images"))[:5]:
        out.append(tmp_path / "imgs" / name)
        shutil.copy(FLICKR / "images" / name, out[-1])
    return out


def build(images, encoder, folder, **kwargs):
    options = dict(img_size=32, folder=folder, dtype="fp32", batch_size=2, num_workers=0)
    return TokenCache.build(images, encoder, **{**options, **kwargs})


def test_cache_reused_rebuilt_on_new_weights_and_half_written(images, tmp_path):
    folder = tmp_path / "cache"
    encoder = Patchify()
    first = build(images, encoder, folder)
    assert encoder.calls == 3 and len(first) == 5 and first.tokens_shape == (16, 8) and first.missing == set()
    assert first.path == folder / f"{first.key}.bin"
    again = build(images, encoder, folder)
    assert encoder.calls == 3 and again.key == first.key  # reused: the encoder did not run
    assert torch.equal(again[4], first[4])
    with torch.no_grad():
        encoder.proj.bias.add_(0.5)
    changed = build(images, encoder, folder)
    assert encoder.calls == 6 and changed.key != first.key
    torch.testing.assert_close(changed[0], first[0] + 0.5, rtol=0, atol=1e-5)
    # a cache whose completion marker is missing or false is rebuilt, never read
    meta_path = folder / f"{changed.key}.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "complete": False}))
    assert TokenCache.open(folder, changed.key) is None
    build(images, encoder, folder)
    assert encoder.calls == 9 and json.loads(meta_path.read_text())["complete"] is True
    meta_path.unlink()
    build(images, encoder, folder)
    assert encoder.calls == 12
    with open(folder / f"{changed.key}.bin", "r+b") as handle:  # a truncated array is not complete either
        handle.truncate(100)
    build(images, encoder, folder)
    assert encoder.calls == 15 and not list(folder.glob("*.tmp*"))


def test_cache_key_follows_images_size_dtype_and_fingerprint(images, tmp_path):
    folder, encoder = tmp_path / "cache", Patchify()
    keys = {build(images, encoder, folder).key}
    keys.add(build(images, encoder, folder, img_size=16).key)
    keys.add(build(images, encoder, folder, dtype="bf16").key)
    keys.add(build(images[:4], encoder, folder).key)
    keys.add(build(images, encoder, folder, encoder_fingerprint="v1").key)
    stat = os.stat(images[0])
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    keys.add(build(images, encoder, folder).key)
    assert len(keys) == 6
    assert build(images, Patchify(), folder).key in keys  # same weights in a new module: same fingerprint
    assert build(images, Patchify(seed=1), folder).key not in keys
    with pytest.raises(ValueError, match=r"data.cache_dtype 'fp16' is unknown"):
        build(images, encoder, folder, dtype="fp16")


def test_bf16_storage_is_uint16_bits(images, tmp_path):
    encoder = Patchify()
    cache = build(images, encoder, tmp_path / "cache", dtype="bf16")
    assert cache.path.stat().st_size == 5 * 16 * 8 * 2
    raw = np.fromfile(cache.path, dtype=np.uint16).reshape(5, 16, 8)
    assert torch.equal(torch.from_numpy(raw[3].astype(np.int32)).to(torch.int16).view(torch.bfloat16), cache[3])
    pixels = torch.stack([fixed_view_transform(32)(load_rgb_uint8(p)) for p in images])
    with torch.no_grad():
        reference = encoder(DeviceNormalize()(Batch(pixels=pixels)).pixels)
    assert torch.equal(torch.stack([cache[i] for i in range(5)]), reference.to(torch.bfloat16))
    with pytest.raises(IndexError, match="image index 5 is outside the token cache of 5 images"):
        cache[5]


def test_corrupt_image_is_a_zero_row_or_raises(images, tmp_path, caplog):
    broken = tmp_path / "imgs" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    paths = images[:2] + [broken] + images[2:]
    cache = build(paths, Patchify(), tmp_path / "cache")
    assert cache.missing == {2} and not cache[2].any() and cache[1].abs().sum() > 0
    assert "broken.jpg" in caplog.text
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        build(paths, Patchify(), tmp_path / "cache2", on_corrupt="raise")
    with pytest.raises(CorruptImageError, match="every one of the 1 images was corrupt"):
        build([broken], Patchify(), tmp_path / "cache3")


def test_distributed_rank_zero_builds_others_read_after_the_barrier(images, tmp_path, monkeypatch):
    """In-process: rank 1's barrier is where rank 0 builds; rank 1 never runs its encoder."""
    folder, events = tmp_path / "cache", []
    rank = {"value": 1}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank["value"])
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)  # the DataLoader asks
    rank_zero = Patchify()

    def barrier():
        events.append(("barrier", rank["value"], sorted(p.suffix for p in folder.glob("*"))))
        if rank["value"] == 1:  # rank 0 builds while rank 1 waits here
            rank["value"] = 0
            build(images, rank_zero, folder)
            rank["value"] = 1

    monkeypatch.setattr(torch.distributed, "barrier", barrier)
    rank_one = Patchify()
    cache = build(images, rank_one, folder)
    assert rank_one.calls == 0 and rank_zero.calls == 3 and len(cache) == 5
    assert events == [("barrier", 1, []), ("barrier", 0, [".bin", ".json"])]  # rank 0 reaches it after writing


def _dist_worker(rank: int, world_size: int, init_file: str, images: list, folder: str, results: str) -> None:
    with gloo_group(rank, world_size, init_file):
        encoder = Patchify()
        cache = TokenCache.build(images, encoder, img_size=32, folder=folder, dtype="fp32", batch_size=2,
                                 num_workers=0)
        torch.save({"calls": encoder.calls, "tokens": cache[1]}, f"{results}/{rank}.pt")


@pytest.mark.slow
def test_rank_zero_builds_and_the_others_wait(images, tmp_path):
    import torch.multiprocessing as mp

    # fork: the children need not import torch again (spawn costs ~10 s each on 2 cores)
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init"), images, str(tmp_path / "cache"), str(tmp_path)),
                       nprocs=2, start_method="fork")
    rank0, rank1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert rank0["calls"] == 3 and rank1["calls"] == 0
    assert torch.equal(rank0["tokens"], rank1["tokens"])
