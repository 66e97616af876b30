"""Steering samplers against exact answers: the exact flow map of a mixture prior and its exact posterior."""

import pytest
import torch

from flowmaps.metrics.samples import energy_distance
from flowmaps.oracle import Gaussian
from flowmaps.steering import (
    STEERERS,
    CallableReward,
    LinearGaussianLikelihood,
    RewardError,
    SteeringError,
    build_steerer,
    steer,
)
from flowmaps.steering.operators import MatrixOperator, parse_operator
from tests.steering.exact import SQUARE, Meter, exact_model

A, Y, NOISE = torch.tensor([[1.0, 1.0]]), torch.tensor([0.3]), 0.5
SHARP = LinearGaussianLikelihood(MatrixOperator(A), Y, 0.2, (2,))
LIKELIHOOD = LinearGaussianLikelihood(MatrixOperator(A), Y, NOISE, (2,))
ZERO = CallableReward(lambda x, c: 0.0 * x.flatten(1).sum(1), "zero")


def _particles(name: str) -> int:
    return 4 if build_steerer(name).weighted else 1


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(STEERERS))
def test_every_sampler_counts_its_nfe_and_keeps_the_budget(name):
    """The NFE a sampler reports is what it spent (forward calls + 2 per backward) and fits the budget."""
    meter = Meter(exact_model())
    particles = _particles(name)
    result = steer(meter, LIKELIHOOD, 8, name, nfe=12, particles=particles, generator=_gen())
    assert result.samples.shape == (8, 2) and result.reward.shape == (8,)
    assert result.nfe == meter.nfe <= 12
    assert result.nfe == build_steerer(name).cost(result.steps, particles)
    assert 0 < result.ess <= 1 and result.particles == particles
    assert set(result.metrics()) >= {"reward_mean", "nfe_per_particle", "ess", "particles"}


@pytest.mark.parametrize("name", sorted(n for n in STEERERS if n != "posterior-guidance"))
def test_zero_reward_leaves_the_prior(name):
    """With r = 0 every sampler draws the model's own distribution (here the exact prior)."""
    result = steer(exact_model(), ZERO, 300, name, nfe=16, particles=_particles(name), generator=_gen(1))
    prior = SQUARE.sample(300, _gen(2))
    floor = energy_distance(SQUARE.sample(300, _gen(3)), prior)
    assert energy_distance(result.samples, prior) < 4 * floor + 0.01


def test_fmtt_without_noise_is_the_exact_flow_map():
    """eta = 0: no tilt and no noise, so the split steps compose the exact map F(eps, 1, 0)."""
    result = steer(exact_model(), LIKELIHOOD, 16, "fmtt", nfe=6, eta=0.0, generator=_gen(4))
    noise = torch.randn(16, 2, generator=_gen(4))
    assert torch.allclose(result.samples, SQUARE.flow_map(noise, 1.0, 0.0), atol=1e-4)


@pytest.mark.slow
def test_smc_approaches_the_exact_posterior_as_particles_grow():
    """Twisted SMC with the exact flow map: energy distance to exact posterior samples falls to the floor."""
    n = 400
    post = SQUARE.posterior(A, Y, 0.2)
    ref = post.sample(n, _gen(5))
    floor = sum(energy_distance(post.sample(n, _gen(6 + i)), ref) for i in range(3)) / 3
    dist = {k: energy_distance(steer(exact_model(), SHARP, n, "smc", nfe=16, particles=k,
                                     generator=_gen(10)).samples, ref) for k in (1, 4, 32)}
    assert max(dist[4], dist[32]) < dist[1] / 5, dist
    assert dist[32] < 2.5 * floor, (dist, floor)


@pytest.mark.slow
def test_best_of_n_bias_grows_with_n_while_resampling_converges():
    """Best-of-N (max) collapses onto the reward's maximisers; its resampling twin tends to the posterior."""
    prior = Gaussian([0.0, 0.0], [1.0, 1.0])
    model = exact_model(prior)
    post = prior.posterior(A, Y, NOISE)
    ref = post.sample(600, _gen(7))
    by_max = {k: energy_distance(steer(model, LIKELIHOOD, 600, "best-of-n", nfe=1, particles=k,
                                       generator=_gen(8)).samples, ref) for k in (4, 256)}
    by_resampling = {k: energy_distance(steer(model, LIKELIHOOD, 600, "best-of-n", nfe=1, particles=k,
                                              select="resample", generator=_gen(8)).samples, ref) for k in (1, 256)}
    assert by_max[256] > 2 * by_max[4] and by_max[256] > 3 * by_resampling[256], (by_max, by_resampling)
    assert by_resampling[256] < by_resampling[1] / 5, by_resampling


def test_posterior_guidance_is_exact_for_an_isotropic_gaussian_prior():
    """ΠGDM's Gaussian approximation of p(x0 | x_t) is exact for N(mu, c^2 I): many steps give the posterior."""
    prior = Gaussian([0.5, -0.5], [0.8, 0.8])
    post = prior.posterior(A, Y, NOISE)
    result = steer(exact_model(prior), LIKELIHOOD, 20_000, "posterior-guidance", nfe=200, data_std=0.8,
                   generator=_gen(9))
    x = result.samples.double()
    assert torch.allclose(x.mean(0), post.mean(), atol=0.02), (x.mean(0), post.mean())
    assert torch.allclose(x.T.cov(), post.covariance(), atol=0.02), (x.T.cov(), post.covariance())


def test_conditions_reach_every_particle():
    """A class label steers within its class: with r = 0 and class 1 the samples are class 1's."""
    cond = torch.ones(200, dtype=torch.long)
    result = steer(exact_model(), ZERO, 200, "smc", nfe=12, particles=4, cond=cond, generator=_gen(11))
    assert bool((result.samples[:, 0] > 0).float().mean() > 0.97)


@pytest.mark.parametrize("spec, shape", [("inpaint:half", (1, 4, 4)), ("downsample:2", (1, 4, 4)),
                                         ("denoise", (1, 4, 4)), ("inpaint:half", (16,))])
def test_image_shaped_samples_and_operators(spec, shape):
    """Samplers keep any sample shape; each operator's dense matrix and Gram solve agree with its action."""
    from flowmaps.oracle import GaussianMixture

    mix = GaussianMixture([0.5, 0.5], torch.stack([torch.full((16,), -0.5), torch.full((16,), 0.5)]), 0.3)
    op = parse_operator(spec, shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    dense = op.matrix(shape)
    assert torch.allclose(op(x).flatten(1), x.flatten(1) @ dense.T)
    v, a = torch.randn(3, dense.shape[0], dtype=torch.float64), torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
    want = torch.linalg.solve(a[:, None, None] * (dense @ dense.T) + 0.25 * torch.eye(dense.shape[0]), v)
    got = op.solve_gram(v.reshape(3, *op.out_shape(shape)), a, 0.25).flatten(1)
    assert torch.allclose(got, want)
    truth = mix.sample(1, _gen(12)).reshape(1, *shape)
    reward = LinearGaussianLikelihood(op, op(truth)[0], 0.2, shape)
    result = steer(exact_model(mix, shape), reward, 6, "smc", nfe=12, particles=2, generator=_gen(13))
    assert result.samples.shape == (6, *shape)


def test_bad_settings_are_named():
    model = exact_model()
    with pytest.raises(SteeringError, match="particles"):
        steer(model, LIKELIHOOD, 4, "smc", particles=0)
    with pytest.raises(SteeringError, match="particles=1"):
        steer(model, LIKELIHOOD, 4, "dps", particles=2)
    with pytest.raises(SteeringError, match="NFE per particle"):
        steer(model, LIKELIHOOD, 4, "fmtt", nfe=1)
    with pytest.raises(SteeringError, match="unknown steering method"):
        steer(model, LIKELIHOOD, 4, "tds")
    with pytest.raises(SteeringError, match="look-ahead"):
        steer(model, LIKELIHOOD, 4, "smc", lookahead="oracle")
    with pytest.raises(SteeringError, match="ESS threshold"):
        steer(model, LIKELIHOOD, 4, "smc", ess_threshold=1.5)
    with pytest.raises(SteeringError, match="eta"):
        steer(model, LIKELIHOOD, 4, "fmtt", eta=float("nan"))
    with pytest.raises(SteeringError, match="linear-Gaussian"):
        steer(model, ZERO, 4, "posterior-guidance")


@pytest.mark.parametrize("fn, match", [
    (lambda x, c: x.sum(), "one value per sample"),
    (lambda x, c: x[:, 0] * float("nan"), "not finite"),
    (lambda x, c: x[:, 0].detach(), "no gradient"),
    (lambda x, c: (x[:, 0] > 0).long(), "floats"),
])
def test_bad_rewards_are_named(fn, match):
    with pytest.raises(RewardError, match=match):
        steer(exact_model(), CallableReward(fn, "mine"), 4, "fmtt", nfe=12)


def test_bad_operators_and_measurements_are_named():
    from flowmaps.steering import OperatorError

    with pytest.raises(OperatorError, match="downsample:2 needs"):
        parse_operator("downsample:2", (16,))
    with pytest.raises(OperatorError, match="unknown operator"):
        parse_operator("blur:3", (1, 4, 4))
    with pytest.raises(OperatorError, match=r"\[1, 2\]"):
        MatrixOperator(torch.ones(1, 2)).check_shape((3,))
    with pytest.raises(RewardError, match="measurement has 2 numbers"):
        LinearGaussianLikelihood(MatrixOperator(A), torch.zeros(2), 0.5, (2,))
    with pytest.raises(ValueError, match="noise std"):
        LinearGaussianLikelihood(MatrixOperator(A), Y, -1.0, (2,))


def test_guided_conditions_reach_every_particle():
    """A ``Guided`` condition (labels and scales) is repeated for each of an output's particles."""
    from torch import nn

    from flowmaps.conditions import Guided, labels_of

    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.shape = exact_model(), (2,)

        def forward(self, x, s, t, cond=None, **kw):
            seen.append(cond)
            return self.inner(x, s, t, labels_of(cond), **kw)

    cond = Guided(torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 3.0]))
    steer(Recording(), ZERO, 3, "smc", nfe=12, particles=4, cond=cond, generator=_gen(14))
    assert all(isinstance(c, Guided) and c.labels.tolist() == [0] * 4 + [1] * 8 and
               c.scale.tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 4 for c in seen)


def test_fmtt_jarzynski_weights_without_noise_are_exact_importance_weights():
    """eta = 0 on the exact map: r(F(x_t, t, 0)) is constant along each path, so FMTT's Jarzynski weights
    sum to r(x0) and its particles are importance-resampled prior samples: more particles, closer to the
    exact posterior."""
    n = 300
    post = SQUARE.posterior(A, Y, NOISE)
    ref = post.sample(n, _gen(15))
    floor = sum(energy_distance(post.sample(n, _gen(16 + i)), ref) for i in range(3)) / 3
    dist = {k: energy_distance(steer(exact_model(), LIKELIHOOD, n, "fmtt", nfe=6, particles=k, eta=0.0,
                                     generator=_gen(17)).samples, ref) for k in (1, 64)}
    assert dist[64] < 3 * floor < dist[1], (dist, floor)
