"""Probes on synthetic features: separable classes are learnt (~100%), random labels stay near chance;
k-shot sampling; the parallel-head grid really trains different heads."""
import pytest
import torch

from eval.attentive import AttentiveConfig, attentive_probe
from eval.grid import stratified_holdout
from eval.knn import knn_accuracy
from eval.linear import LinearConfig, linear_probe
from eval.lowshot import choose_lambda, k_shot_sweep, sample_k_shot, summarise_runs

CLASSES, DIM = 5, 32


def separable(n, seed, tokens=0):
    """Class centers far apart + small noise: (n, DIM) or (n, tokens, DIM) features, labels (n,)."""
    gen = torch.Generator().manual_seed(99)
    centers = 3 * torch.randn(CLASSES, DIM, generator=gen)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    shape = (n, tokens, DIM) if tokens else (n, DIM)
    noise = 0.5 * torch.randn(shape, generator=gen)
    base = centers[labels][:, None] if tokens else centers[labels]
    return base + noise, labels


def random_labelled(n, seed, tokens=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, tokens, DIM) if tokens else (n, DIM)
    return torch.randn(shape, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


LINEAR = LinearConfig(lrs=[0.01, 0.1], weight_decays=[0.0, 1e-4], epochs=15, batch_size=64)
ATTENTIVE = AttentiveConfig(lrs=[1e-3, 3e-3], weight_decays=[0.01], epochs=8, batch_size=64, warmup_epochs=1)


def test_linear_probe_separable_and_random():
    x, y = separable(400, 0)
    vx, vy = separable(200, 1)
    result = linear_probe(x, y, vx, vy, CLASSES, LINEAR, seed=0)
    assert len(result.heads) == 4
    assert result.selected_head["val_top1"] > 0.98
    assert result.best_head["val_top1"] >= result.selected_head["val_top1"]
    assert result.val_predictions.shape == (200,)
    x, y = random_labelled(400, 2)
    vx, vy = random_labelled(400, 3)
    chance = linear_probe(x, y, vx, vy, CLASSES, LINEAR, seed=0)
    assert chance.selected_head["val_top1"] < 0.32  # chance: 0.2


def test_linear_heads_differ_by_learning_rate():
    x, y = random_labelled(300, 4)
    cfg = LinearConfig(lrs=[1e-6, 1.0], weight_decays=[0.0], epochs=5, batch_size=64)
    result = linear_probe(x, y, x[:100], y[:100], CLASSES, cfg, seed=0)
    # training accuracy: the lr=1 head memorises part of the random labels, the lr=1e-6 head stays at chance
    assert result.heads[1]["val_top1"] > result.heads[0]["val_top1"] + 0.1


def test_attentive_probe_separable_and_random():
    x, y = separable(300, 0, tokens=4)
    vx, vy = separable(100, 1, tokens=4)
    result = attentive_probe(x.half(), y, vx.half(), vy, CLASSES, ATTENTIVE, seed=0)
    assert result.selected_head["val_top1"] > 0.97
    x, y = random_labelled(300, 2, tokens=4)
    vx, vy = random_labelled(300, 3, tokens=4)
    chance = attentive_probe(x, y, vx, vy, CLASSES, ATTENTIVE, seed=0)
    assert chance.selected_head["val_top1"] < 0.32


def test_attentive_probe_depth4_runs():
    x, y = separable(60, 0, tokens=3)
    cfg = AttentiveConfig(depth=4, num_heads=2, lrs=[1e-3], weight_decays=[0.0], epochs=1, batch_size=32)
    result = attentive_probe(x, y, x, y, CLASSES, cfg, seed=0)
    assert len(result.heads) == 1


def test_knn_separable_and_random():
    x, y = separable(300, 0)
    vx, vy = separable(100, 1)
    acc = knn_accuracy(x, y, vx, vy, CLASSES, [10, 20, 200])
    assert set(acc) == {10, 20, 200} and all(v["top1"] > 0.99 for v in acc.values())
    x, y = random_labelled(300, 2)
    vx, vy = random_labelled(300, 3)
    assert knn_accuracy(x, y, vx, vy, CLASSES, [20])[20]["top1"] < 0.32


def test_k_shot_sampling_exact_and_seeded():
    labels = torch.arange(100) % CLASSES
    for k in (1, 2, 5, 13):
        idx = sample_k_shot(labels, k, seed=3)
        assert torch.equal(torch.bincount(labels[idx], minlength=CLASSES), torch.full((CLASSES,), k))
        assert len(set(idx.tolist())) == len(idx)
        assert torch.equal(idx, sample_k_shot(labels, k, seed=3))
    assert not torch.equal(sample_k_shot(labels, 5, seed=0), sample_k_shot(labels, 5, seed=1))
    with pytest.raises(ValueError, match="only 20 train images"):
        sample_k_shot(labels, 21, seed=0)


def test_lowshot_logreg_separable_random_and_cv():
    x, y = separable(200, 0)
    vx, vy = separable(100, 1)
    runs = k_shot_sweep(x, y, vx, vy, CLASSES, shots=[1, 5], seeds=[0, 1], lambdas=[1e-4, 1e-2], folds=5,
                        default_lambda=1e-3, max_iter=100)
    summary = summarise_runs(runs)
    assert set(summary) == {1, 5} and summary[5][0] > 0.98 and summary[5][2] == 2
    one_shot = [r for r in runs if r.shots == 1]
    assert all(r.lam == 1e-3 and "no cross-validation" in r.lam_selection for r in one_shot)
    assert all("5-fold" in r.lam_selection for r in runs if r.shots == 5)
    x, y = random_labelled(200, 2)
    vx, vy = random_labelled(300, 3)
    chance = summarise_runs(k_shot_sweep(x, y, vx, vy, CLASSES, [13], [0], [1e-3], 5, 1e-3, max_iter=100))
    assert chance[13][0] < 0.32


def test_cv_picks_the_regularisation_that_generalises():
    # class means differ a little along a clean axis and a lot along a very noisy one: a huge L2 penalty
    # degenerates to the mean-difference direction (the noisy axis); a small one finds the clean axis
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 2
    x = torch.stack([0.5 * y + 0.05 * torch.randn(60, generator=gen),
                     2.0 * y + 10 * torch.randn(60, generator=gen)], dim=1)
    lam, how = choose_lambda(x, y, 2, [1e-4, 1e3], 5, 1e-3)
    assert lam == 1e-4 and "5-fold" in how


def test_stratified_holdout():
    labels = torch.arange(200) % 4
    fit, held = stratified_holdout(labels, 0.1, seed=0)
    assert len(set(fit.tolist()) & set(held.tolist())) == 0 and len(fit) + len(held) == 200
    assert torch.equal(torch.bincount(labels[held]), torch.full((4,), 5))
