"""The exact posterior of a mixture prior (spec §9) against brute-force importance sampling."""

import math

import pytest
import torch

from flowmaps.oracle import GaussianMixture

MIX = GaussianMixture([0.3, 0.7], [[-1.0, 0.0, 0.5], [1.5, 1.0, -0.5]], [[0.3, 0.5, 0.4], [0.4, 0.2, 0.6]])


def _importance(a: torch.Tensor, y: torch.Tensor, noise_std: float, n: int = 400_000):
    x = MIX.sample(n, torch.Generator().manual_seed(0)).double()
    log_w = -((x @ a.T - y) ** 2).sum(1) / (2 * noise_std**2)
    w = torch.softmax(log_w, 0)
    mean = w @ x
    centred = x - mean
    return mean, (w[:, None] * centred).T @ centred, 1.0 / w.pow(2).sum()


@pytest.mark.parametrize("a, y, noise_std", [
    ([[1.0, 0.5, 0.0]], [0.4], 0.3),
    ([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [1.2, -0.3], 0.5),
    (torch.eye(3).tolist(), [0.2, 0.3, 0.1], 1.0),
])
def test_posterior_matches_importance_sampling(a, y, noise_std):
    a, y = torch.tensor(a, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    post = MIX.posterior(a, y, noise_std)
    mean, cov, ess = _importance(a, y, noise_std)
    tol = 6.0 / math.sqrt(float(ess))  # a few standard errors of the estimate
    assert torch.allclose(post.mean(), mean, atol=tol), (post.mean(), mean)
    assert torch.allclose(post.covariance(), cov, atol=tol), (post.covariance(), cov)
    drawn = post.sample(200_000, torch.Generator().manual_seed(1)).double()
    assert torch.allclose(drawn.mean(0), post.mean(), atol=0.01)
    assert torch.allclose(drawn.T.cov(), post.covariance(), atol=0.01)


def test_posterior_density_and_weights_follow_bayes():
    """log p(x | y) = log p(x) + log p(y | x) - log p(y): the weights, covariances and evidence together."""
    a, y, noise_std = torch.tensor([[0.7, -0.2, 1.0]], dtype=torch.float64), torch.tensor([0.5]), 0.4
    post = MIX.posterior(a, y, noise_std)
    x = MIX.sample(64, torch.Generator().manual_seed(2)).double()
    log_lik = -((x @ a.T - y.double()) ** 2).sum(1) / (2 * noise_std**2) - 0.5 * math.log(2 * math.pi * noise_std**2)
    assert torch.allclose(post.log_density(x), MIX.log_density(x, 0.0) + log_lik - post.log_evidence, atol=1e-9)
    assert math.isclose(float(post.weights.sum()), 1.0, abs_tol=1e-12)


def test_quadratic_tilt_is_the_posterior_with_inverse_strength():
    b, target, strength = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0.5]), 4.0
    tilted, post = MIX.tilted(b, target, strength), MIX.posterior(b, target, 0.5)
    assert torch.allclose(tilted.means, post.means) and torch.allclose(tilted.weights, post.weights)


@pytest.mark.parametrize("noise_std", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_noise_std_is_named(noise_std):
    with pytest.raises(ValueError, match="noise std"):
        MIX.posterior([[1.0, 0.0, 0.0]], [0.0], noise_std)


def test_operator_and_measurement_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[M, 3\]"):
        MIX.posterior([[1.0, 0.0]], [0.0], 1.0)
    with pytest.raises(ValueError, match="measurement has 2 entries"):
        MIX.posterior([[1.0, 0.0, 0.0]], [0.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="strength"):
        MIX.tilted([[1.0, 0.0, 0.0]], [0.0], 0.0)
