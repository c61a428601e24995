"""VL-JEPA losses against closed forms: InfoNCE (single- and multi-positive, 2-process gather), the learnable
temperature, the cosine loss and SIGReg (Epps–Pulley expectations)."""
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gloo_group import gloo_group
from jepa.losses import LogitScale, cosine_embedding_loss, info_nce, sigreg


def _logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def test_info_nce_hand_computed_3x2():
    pred = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]  # unit rows
    target = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    # pred_i . target_j, written out
    sim = [[0.8, 0.0, 1.0],
           [0.6, 1.0, 0.0],
           [0.96, 0.8, 0.6]]
    scale = 2.0
    rows = [_logsumexp([scale * s for s in sim[i]]) - scale * sim[i][i] for i in range(3)]
    cols = [_logsumexp([scale * sim[i][j] for i in range(3)]) - scale * sim[j][j] for j in range(3)]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    # inputs scaled by 3 and 0.5: info_nce normalises them itself
    loss = info_nce(3 * torch.tensor(pred), 0.5 * torch.tensor(target), torch.tensor(scale))
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_info_nce_random_embeddings_near_log_batch():
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(512, 64, generator=generator), torch.randn(512, 64, generator=generator)
    loss = info_nce(pred, target, torch.tensor(1.0))
    # cosines ~ N(0, 1/64): E logsumexp ≈ ln B + 1/128, the positive's logit ≈ 0
    assert abs(loss.item() - math.log(512)) / math.log(512) < 0.02


def _multi_positive_reference(pred, target, keys, scale):
    """Soft-target CE written in numpy: row i averages -log softmax over the columns sharing its key."""
    p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    t = target / np.linalg.norm(target, axis=1, keepdims=True)

    def one_way(logits):
        log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        positive = keys[:, None] == keys[None, :]
        return np.mean([-log_softmax[i][positive[i]].mean() for i in range(len(keys))])

    return 0.5 * (one_way(scale * p @ t.T) + one_way(scale * t @ p.T))


def test_info_nce_multi_positive_keys():
    generator = torch.Generator().manual_seed(1)
    pred, target = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    keys = torch.tensor([0, 0, 1, 2, 2, 2])  # e.g. answers "yes", "yes", "red", "two", "two", "two"
    expected = _multi_positive_reference(pred.double().numpy(), target.double().numpy(), keys.numpy(), 5.0)
    loss = info_nce(pred, target, torch.tensor(5.0), keys=keys)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    # distinct keys: the diagonal is the only positive, as keys=None
    distinct = info_nce(pred, target, torch.tensor(5.0), keys=torch.arange(6))
    torch.testing.assert_close(distinct, info_nce(pred, target, torch.tensor(5.0)))
    # all keys equal: the soft target is uniform, the loss is >= ln B (its entropy) with equality iff every row's
    # logits are equal, e.g. when every embedding is the same vector
    same = torch.ones(6, 4)
    equal_keys = torch.zeros(6, dtype=torch.long)
    assert math.isclose(info_nce(same, same, torch.tensor(5.0), keys=equal_keys).item(), math.log(6), rel_tol=1e-6)
    assert info_nce(pred, target, torch.tensor(5.0), keys=equal_keys).item() > math.log(6) + 1e-3


def test_info_nce_gradients_flow_and_bad_shapes():
    pred = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 8, requires_grad=True)
    scale = LogitScale()
    info_nce(pred, target, scale()).backward()
    for grad in (pred.grad, target.grad, scale.log_scale.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(4, 7\)"):
        info_nce(pred, torch.randn(4, 7), scale())
    with pytest.raises(ValueError, match="keys must have shape"):
        info_nce(pred, target, scale(), keys=torch.zeros(3, dtype=torch.long))


def test_logit_scale_init_and_clamp():
    scale = LogitScale(0.07)
    assert math.isclose(scale().item(), 1 / 0.07, rel_tol=1e-6)
    assert [name for name, _ in scale.named_parameters()] == ["log_scale"]
    with torch.no_grad():
        scale.log_scale.fill_(10.0)  # exp(10) > 100
    value = scale()
    value.backward()
    assert value.item() == 100.0 and scale.log_scale.grad.item() == 0.0  # clamped: no push further up
    fixed = LogitScale(0.5, learnable=False)
    assert list(fixed.parameters()) == [] and math.isclose(fixed().item(), 2.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="above max_scale"):
        LogitScale(0.001)


def _full_batch():
    generator = torch.Generator().manual_seed(3)
    pred, target = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    keys = torch.tensor([0, 1, 0, 2, 3, 1, 0, 4])  # positives on both ranks
    return pred, target, keys


def _loss_and_grads(pred, target, keys, log_scale):
    pred, target = pred.clone().requires_grad_(), target.clone().requires_grad_()
    log_scale = log_scale.clone().requires_grad_()
    loss = info_nce(pred, target, log_scale.exp(), keys=keys)
    loss.backward()
    return loss.detach(), pred.grad, target.grad, log_scale.grad


def _rank_worker(rank, world, rendezvous, out_dir):
    with gloo_group(rank, world, rendezvous):
        pred, target, keys = _full_batch()
        rows = slice(rank * 4, rank * 4 + 4)
        results = {}
        for name, key in (("diagonal", None), ("keys", keys[rows])):
            results[name] = _loss_and_grads(pred[rows], target[rows], key, torch.tensor(1.5))
        torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_info_nce_gather_two_processes_equals_full_batch(tmp_path):
    world = 2
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    pred, target, keys = _full_batch()
    for name, key in (("diagonal", None), ("keys", keys)):
        loss, grad_pred, grad_target, grad_scale = _loss_and_grads(pred, target, key, torch.tensor(1.5))
        rank_losses = torch.stack([ranks[r][name][0] for r in range(world)])
        torch.testing.assert_close(rank_losses.mean(), loss, rtol=0, atol=1e-6)
        # the gather's backward sums all ranks' losses into each rank's rows: grad_r = sum_s dL_s/dx_r
        # = W * dL_full/dx_r (L_full = mean_s L_s); DDP's mean over ranks divides by W again
        torch.testing.assert_close(torch.cat([ranks[r][name][1] for r in range(world)]) / world, grad_pred,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([ranks[r][name][2] for r in range(world)]) / world, grad_target,
                                   rtol=1e-5, atol=1e-6)
        # a replicated parameter (the temperature) gets dL_r/ds on rank r: their DDP mean is the full gradient
        torch.testing.assert_close(torch.stack([ranks[r][name][3] for r in range(world)]).mean(), grad_scale,
                                   rtol=1e-5, atol=1e-6)


def test_cosine_embedding_loss():
    x = torch.randn(5, 7)
    assert cosine_embedding_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_embedding_loss(x, -2 * x).item() == pytest.approx(2.0, abs=1e-6)
    orthogonal = cosine_embedding_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert orthogonal.item() == pytest.approx(1.0, abs=1e-7)


def _trapezoid(values, t):
    step = t[1] - t[0]
    return step * (values.sum() - 0.5 * (values[0] + values[-1]))


def test_sigreg_gaussian_collapsed_scaled():
    t = np.linspace(-3.0, 3.0, 17)
    phi = np.exp(-t ** 2 / 2)
    # B * E|φ_emp − φ|² = 1 − φ² for N(0, 1) samples: the expected statistic, with the same trapezoid
    gaussian_expectation = _trapezoid((1 - phi ** 2) * phi, t)
    generator = torch.Generator().manual_seed(0)
    # one batch's statistic has a spread of ~10 % (the directions share the batch): average 32 batches
    values = [sigreg(torch.randn(256, 32, generator=generator), num_directions=64, generator=generator).item()
              for _ in range(32)]
    assert abs(np.mean(values) - gaussian_expectation) / gaussian_expectation < 0.1 and max(values) < 2.5
    gaussian = torch.randn(512, 64, generator=generator)
    # all rows at 0: φ_emp = 1, error (1 − φ)² in every direction
    zeros = sigreg(torch.zeros(512, 64), num_directions=16, generator=generator).item()
    assert math.isclose(zeros, 512 * _trapezoid((1 - phi) ** 2 * phi, t), rel_tol=1e-4)
    collapsed = gaussian[:1].expand(512, -1)  # every row the same sample
    assert sigreg(collapsed, num_directions=64, generator=generator).item() > 50 * gaussian_expectation
    scaled = sigreg(10 * gaussian, num_directions=64, generator=generator).item()
    assert scaled > 50 * gaussian_expectation


def test_sigreg_deterministic_given_generator_and_differentiable():
    z = torch.randn(64, 16, requires_grad=True)
    first = sigreg(z, num_directions=32, generator=torch.Generator().manual_seed(5))
    again = sigreg(z, num_directions=32, generator=torch.Generator().manual_seed(5))
    other = sigreg(z, num_directions=32, generator=torch.Generator().manual_seed(6))
    assert first.item() == again.item() and first.item() != other.item()
    first.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        sigreg(torch.randn(2, 3, 4))
