"""Tempered SMC on the flow map's noise (``noise-smc``) against exact posteriors, and its tempering rule."""

import pytest
import torch

from flowmaps.metrics.samples import energy_distance
from flowmaps.oracle import Gaussian
from flowmaps.steering import LinearGaussianLikelihood, SteeringError, steer
from flowmaps.steering.noise_smc import conditional_ess, next_temperature
from flowmaps.steering.operators import MatrixOperator
from tests.steering.exact import SQUARE, Meter, exact_model

A, Y = torch.tensor([[1.0, 1.0]]), torch.tensor([0.3])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_tempering_keeps_the_conditional_ess_and_reaches_one_at_the_last_stage():
    g = _gen(0)
    log_w, r = torch.randn(6, 32, generator=g, dtype=torch.float64), -20 * torch.rand(6, 32, generator=g,
                                                                                     dtype=torch.float64)
    lam = torch.full((6,), 0.2, dtype=torch.float64)
    new = next_temperature(log_w, r, lam, stages_left=20, target=0.5)
    assert bool((new > lam).all() and (new <= 1).all())
    assert bool((new - lam >= 0.8 / 20 - 1e-12).all())  # at least an even share of what remains
    free = new - lam > 0.8 / 20 + 1e-9  # where the ESS rule, not the floor, set the step
    assert bool(free.any())
    cess = conditional_ess(log_w, (new - lam)[:, None] * r)
    assert torch.allclose(cess[free], torch.full_like(cess[free], 0.5), atol=1e-6), cess
    assert torch.equal(next_temperature(log_w, r, lam, stages_left=1, target=0.5), torch.ones(6, dtype=torch.float64))
    flat = next_temperature(log_w, torch.zeros_like(r), lam, stages_left=5, target=0.5)
    assert torch.equal(flat, torch.ones(6, dtype=torch.float64))  # no information: straight to the target


def test_noise_smc_reproduces_a_gaussian_posterior():
    """For a Gaussian prior the noise-space target is Gaussian too; many particles give the exact posterior."""
    prior = Gaussian([0.5, -0.5], [0.8, 0.8])
    reward = LinearGaussianLikelihood(MatrixOperator(A), Y, 0.3, (2,))
    post = prior.posterior(A, Y, 0.3)
    result = steer(exact_model(prior), reward, 4000, "noise-smc", nfe=16, particles=16, generator=_gen(1))
    x = result.samples.double()
    assert torch.allclose(x.mean(0), post.mean(), atol=0.03), (x.mean(0), post.mean())
    assert torch.allclose(x.T.cov(), post.covariance(), atol=0.03), (x.T.cov(), post.covariance())
    assert 0.1 < result.extra["acceptance"] < 0.9


@pytest.mark.slow
def test_noise_smc_approaches_the_exact_posterior_as_particles_grow():
    """On a four-mode prior with a sharp measurement: one chain does not reweight the modes; 16 particles
    reach the floor."""
    n = 300
    reward = LinearGaussianLikelihood(MatrixOperator(A), Y, 0.05, (2,))
    post = SQUARE.posterior(A, Y, 0.05)
    ref = post.sample(n, _gen(5))
    floor = sum(energy_distance(post.sample(n, _gen(6 + i)), ref) for i in range(3)) / 3
    dist = {k: energy_distance(steer(exact_model(), reward, n, "noise-smc", nfe=12, particles=k,
                                     generator=_gen(10)).samples, ref) for k in (1, 16)}
    assert dist[16] < dist[1] / 3 and dist[16] < 2.5 * floor, (dist, floor)


def test_several_map_steps_cost_what_they_use_and_need_a_deterministic_sampler():
    meter = Meter(exact_model())
    reward = LinearGaussianLikelihood(MatrixOperator(A), Y, 0.5, (2,))
    result = steer(meter, reward, 8, "noise-smc", nfe=13, particles=4, map_steps=3, generator=_gen(2))
    assert result.nfe == meter.nfe == 12 and result.steps == 3  # 3 NFE for the first map, 3 per move
    model = exact_model()
    model.sampler = "consistency"  # re-noises between steps: no deterministic noise-to-data map
    with pytest.raises(SteeringError, match="deterministic"):
        steer(model, reward, 4, "noise-smc", nfe=8, particles=2, map_steps=2)
    assert steer(model, reward, 4, "noise-smc", nfe=8, particles=2).samples.shape == (4, 2)


@pytest.mark.parametrize("options, match", [
    ({"map_steps": 0}, "map_steps"),
    ({"step_size": 0.0}, "step size"),
    ({"step_size": 1.5}, "step size"),
    ({"ess_threshold": 0.0}, "must be > 0"),
    ({"ess_threshold": 2.0}, "ESS threshold"),
])
def test_bad_options_are_named(options, match):
    reward = LinearGaussianLikelihood(MatrixOperator(A), Y, 0.5, (2,))
    with pytest.raises(SteeringError, match=match):
        steer(exact_model(), reward, 4, "noise-smc", nfe=8, particles=2, **options)
