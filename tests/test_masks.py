import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from jepa.masks import MultiBlockMaskSampler, block_size


def dense(mb, grid=256):
    """(B, grid) bool masks of context (without padding) and union of targets."""
    batch = mb.context_idx.shape[0]
    ctx = torch.zeros(batch, grid, dtype=torch.bool)
    for b in range(batch):
        ctx[b, mb.context_idx[b][~mb.context_pad[b]]] = True
    tgt = torch.zeros(batch, grid, dtype=torch.bool)
    tgt.scatter_(1, mb.target_idx.reshape(batch, -1), True)
    return ctx, tgt


def test_no_overlap_and_counts_in_range():
    sampler = MultiBlockMaskSampler((16, 16))
    for step in range(20):
        mb = sampler(32, (0, 0, step))
        ctx, tgt = dense(mb)
        assert not (ctx & tgt).any()
        assert (mb.context_lengths >= sampler.min_keep).all()
        # padding entries are exactly the tail; kept indices are unique and ascending
        for b in range(32):
            kept = mb.context_idx[b][~mb.context_pad[b]]
            assert (kept[1:] > kept[:-1]).all()
        n_t = mb.target_idx.shape[-1]
        assert 0.15 * 256 * 0.7 <= n_t <= 0.2 * 256 * 1.3  # area of one block, rounding of h, w
        assert mb.context_lengths.max() <= 256


def test_pad_keeps_every_sampled_token():
    """Context = (context block) minus targets, entirely; truncate keeps the batch minimum only."""
    pad = MultiBlockMaskSampler((16, 16), equalize="pad")(64, (1, 2, 3))
    cut = MultiBlockMaskSampler((16, 16), equalize="truncate")(64, (1, 2, 3))
    assert torch.equal(pad.target_idx, cut.target_idx)
    assert cut.context_idx.shape[1] == int(pad.context_lengths.min())
    assert pad.context_idx.shape[1] == int(pad.context_lengths.max())
    for b in range(64):
        kept = pad.context_idx[b][~pad.context_pad[b]]
        assert torch.equal(cut.context_idx[b], kept[: cut.context_idx.shape[1]])  # official: sorted, cut


def test_target_coverage_uniform_including_last_row_and_column():
    sampler = MultiBlockMaskSampler((16, 16))
    counts = np.zeros(256)
    samples = 0
    for step in range(200):
        mb = sampler(32, (0, 0, step))
        for block in mb.target_idx.reshape(-1, mb.target_idx.shape[-1]).numpy():
            counts[block] += 1
            samples += 1
    assert samples >= 5000
    grid = counts.reshape(16, 16)
    assert grid[-1, :].min() > 0 and grid[:, -1].min() > 0
    # A uniformly placed h x w block covers interior cells more often than border cells; compare the counts with
    # the exact coverage probability for each drawn block size (chi-square goodness of fit).
    expected = np.zeros((16, 16))
    for step in range(200):
        rng = np.random.default_rng([0, 0, step])
        h, w = block_size(rng, sampler.target_scale, sampler.target_aspect, 16, 16)
        rows = np.array([min(r, 16 - h) - max(0, r - h + 1) + 1 for r in range(16)]) / (16 - h + 1)
        cols = np.array([min(c, 16 - w) - max(0, c - w + 1) + 1 for c in range(16)]) / (16 - w + 1)
        expected += 32 * sampler.num_targets * np.outer(rows, cols)
    _, p_value = chisquare(grid.ravel(), expected.ravel() * grid.sum() / expected.sum())
    assert p_value > 1e-3, p_value


def test_official_truncate_statistics():
    """16x16 grid, batch 128, official bounds: ~111 context tokens sampled, ~70 kept after the cut."""
    pad = MultiBlockMaskSampler((16, 16), equalize="pad", reachable_edges=False)
    cut = MultiBlockMaskSampler((16, 16), equalize="truncate", reachable_edges=False)
    sampled = np.mean([pad(128, (0, 0, s)).context_lengths.float().mean().item() for s in range(50)])
    kept = np.mean([cut(128, (0, 0, s)).context_idx.shape[1] for s in range(50)])
    assert 100 <= sampled <= 120, sampled
    assert 60 <= kept <= 78, kept
    assert 0.25 <= 1 - kept / sampled <= 0.5  # the official cut drops about a third of the context


def test_same_seed_same_masks_and_different_step_differs():
    sampler = MultiBlockMaskSampler((14, 14))
    a, b, c = sampler(16, (3, 1, 7)), sampler(16, (3, 1, 7)), sampler(16, (3, 1, 8))
    assert torch.equal(a.context_idx, b.context_idx) and torch.equal(a.target_idx, b.target_idx)
    assert not (a.context_idx.shape == c.context_idx.shape and torch.equal(a.context_idx, c.context_idx))


def test_rectangular_grid_and_bad_values():
    mb = MultiBlockMaskSampler((6, 10), min_keep=2)(8, (0, 0, 0))
    assert mb.target_idx.max() < 60 and mb.context_idx.max() < 60
    with pytest.raises(ValueError, match="masks.equalize"):
        MultiBlockMaskSampler((8, 8), equalize="cut")
    with pytest.raises(ValueError, match="masks.min_keep"):
        MultiBlockMaskSampler((4, 4), min_keep=17)
    with pytest.raises(ValueError, match="masks.min_keep"):  # impossible: targets cover everything
        MultiBlockMaskSampler((4, 4), min_keep=15, target_scale=(0.9, 1.0))(4, (0, 0, 0))


def test_3d_grid_blocks_are_boxes_and_every_token_is_kept():
    """(T, H, W) = (4, 6, 8): target blocks are t x h x w boxes (time fraction drawn from its range), context keeps
    every sampled token, nothing overlaps, and the last frame / row / column are reachable."""
    grid = (4, 6, 8)
    sampler = MultiBlockMaskSampler(grid, min_keep=4, target_leading_scale=(0.5, 1.0))
    reached = np.zeros(grid, dtype=bool)
    for step in range(40):
        mb = sampler(8, (0, 0, step))
        ctx, tgt = dense(mb, grid=int(np.prod(grid)))
        assert not (ctx & tgt).any()
        assert torch.equal(mb.context_lengths, ctx.sum(1))  # every sampled context token is in the index list
        for block in mb.target_idx.reshape(-1, mb.target_idx.shape[-1]).numpy():
            t, r, c = np.unravel_index(block, grid)
            size = (t.max() - t.min() + 1) * (r.max() - r.min() + 1) * (c.max() - c.min() + 1)
            assert size == len(block) == len(set(block.tolist()))  # a full box
            assert 2 <= t.max() - t.min() + 1 <= 4
            reached[t, r, c] = True
    assert reached[-1].any() and reached[:, -1].any() and reached[:, :, -1].any()


def vjepa_samplers(equalize, grid=(8, 14, 14)):
    """V-JEPA's short-range (8 x 0.15) and long-range (2 x 0.7) block sets; context = the rest of the clip."""
    return [MultiBlockMaskSampler(grid, num_targets=n, target_scale=(s, s), num_context=0, target_union=True,
                                  equalize=equalize, min_keep=10) for n, s in ((8, 0.15), (2, 0.7))]


def time_shares(idx, pad, frames=8, per_frame=196):
    kept = idx[~pad] if pad is not None else idx.reshape(-1)
    return np.bincount((kept // per_frame).numpy(), minlength=frames) / kept.numel()


def test_vjepa_masks_keep_every_token_and_time_is_uniform():
    """Per-time-step share of context and of target tokens is uniform within 5% (relative) when every token is kept;
    context and targets partition the clip."""
    for sampler in vjepa_samplers("pad"):
        ctx_share, tgt_share, tokens = np.zeros(8), np.zeros(8), 0
        for step in range(100):  # 100 batches x 24 clips = 2400 samples
            mb = sampler(24, (0, 0, step))
            assert torch.equal(mb.context_lengths + (~mb.target_pad).sum((1, 2)), torch.full((24,), 8 * 196))
            ctx, tgt = dense(mb, grid=8 * 196)
            tgt = torch.zeros_like(ctx).scatter_(1, mb.target_idx[:, 0], ~mb.target_pad[:, 0])
            assert not (ctx & tgt).any()
            ctx_share += time_shares(mb.context_idx, mb.context_pad)
            tgt_share += time_shares(mb.target_idx[:, 0], mb.target_pad[:, 0])
        for share in (ctx_share / 100, tgt_share / 100):
            assert np.abs(share / share.mean() - 1).max() < 0.05, share


def test_vjepa_truncate_drops_context_and_biases_it_to_early_frames():
    """The official cut (sort, truncate to the batch minimum) drops most long-range context tokens, and what is left
    comes mostly from the first frames; ours keeps them all."""
    pad_sampler, cut_sampler = vjepa_samplers("pad")[1], vjepa_samplers("truncate")[1]
    sampled = kept = 0
    shares = np.zeros(8)
    for step in range(20):
        pad, cut = pad_sampler(24, (0, 0, step)), cut_sampler(24, (0, 0, step))
        sampled += pad.context_lengths.sum().item()
        kept += cut.context_idx.numel()
        shares += time_shares(cut.context_idx, None)
    assert 1 - kept / sampled > 0.5  # most of the sampled context is dropped
    assert (shares / 20)[:2].sum() > 0.4  # the first 2 of 8 frames hold far more than their 25% share
