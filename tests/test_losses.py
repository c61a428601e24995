import math

import pytest
import torch

from jepa.losses import latent_loss, variance_covariance


def test_latent_losses_closed_forms():
    pred = torch.tensor([[0.0, 0.5, 3.0]])
    target = torch.zeros(1, 3)
    assert math.isclose(latent_loss(pred, target, "l1").item(), 3.5 / 3, rel_tol=1e-6)
    assert math.isclose(latent_loss(pred, target, "l2").item(), (0.25 + 9) / 3, rel_tol=1e-6)
    assert math.isclose(latent_loss(pred, target, "smooth_l1").item(), (0.5 * 0.25 + 2.5) / 3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="loss.kind 'huber'"):
        latent_loss(pred, target, "huber")


def test_variance_covariance_closed_forms():
    same = torch.ones(8, 4)  # no spread: every std is sqrt(eps)
    variance, covariance = variance_covariance(same)
    assert math.isclose(variance.item(), 1 - math.sqrt(1e-4), rel_tol=1e-5) and covariance.item() == 0
    torch.manual_seed(0)
    spread = torch.randn(4096, 4) * 3  # std 3 > 1: no variance penalty; nearly independent dims
    variance, covariance = variance_covariance(spread)
    assert variance.item() == 0 and covariance.item() < 0.5
    x = torch.randn(4096, 1)
    correlated = torch.cat([x, x], 1)  # off-diagonal covariances are var(x): (2 * var(x)^2) / D=2 = var(x)^2
    torch.testing.assert_close(variance_covariance(correlated)[1], x.var() ** 2, rtol=1e-4, atol=0)
