import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.oracle import ExactAverageVelocity
from flowmaps.samplers import (
    SAMPLERS, get_sampler,
    as_grid,
    invert,
    round_trip_error,
    sample_consistency,
    sample_flow_map,
    sample_gamma,
    sample_ode,
    time_at_noise_ratio,
    time_grid,
)
from tests.conftest import small_mixture
from tests.methods.exact_checks import assert_exact_samples
from tests.methods.exact_models import exact_model


@pytest.mark.parametrize("grid", [1, 2, 5, [1.0, 0.93, 0.4, 0.05, 0.0], [0.9, 0.3]])
def test_composition_reproduces_exact_gaussian_map(exact_gaussian_map, gaussian, grid):
    noise = torch.randn(32, 3, dtype=torch.float64)
    times = as_grid(grid, None, torch.float64)
    out = sample_flow_map(exact_gaussian_map, noise, grid)
    assert torch.allclose(out, gaussian.flow_map(noise, times[0], times[-1]), atol=1e-9)


def test_composition_reproduces_exact_mixture_map():
    mix = small_mixture()
    model = FlowMap(ExactAverageVelocity(mix))
    noise = torch.randn(16, 2, dtype=torch.float64)
    exact = mix.flow_map(noise, 1.0, 0.0)
    for steps in (1, 3):
        assert torch.allclose(sample_flow_map(model, noise, steps), exact, atol=1e-6)


def test_ode_sampler_converges_to_exact_map(exact_gaussian_map, gaussian):
    noise = torch.randn(64, 3, dtype=torch.float64)
    exact = gaussian.flow_map(noise, 1.0, 0.0)
    errors = {}
    for solver in ("euler", "heun"):
        errors[solver] = [(sample_ode(exact_gaussian_map, noise, n, solver) - exact).abs().max().item() for n in (16, 64)]
    assert errors["euler"][1] < errors["euler"][0] / 3  # first order
    assert errors["heun"][1] < errors["heun"][0] / 10  # second order
    assert errors["heun"][1] < 1e-3


def test_inversion_grid_maps_data_to_noise(exact_gaussian_map, gaussian):
    x0 = torch.randn(8, 3, dtype=torch.float64)
    assert torch.allclose(sample_flow_map(exact_gaussian_map, x0, [0.0, 1.0]), gaussian.flow_map(x0, 0.0, 1.0))


@pytest.mark.parametrize("grid,msg", [([1.0], "at least two"), ([1.0, 1.2], r"\[0, 1\]"),
                                      ([1.0, 0.5, 0.7], "monotone"), (0, "positive integer")])
def test_bad_grids(grid, msg):
    with pytest.raises(ValueError, match=msg):
        as_grid(grid, None, torch.float32) if not isinstance(grid, int) else time_grid(grid)


def test_time_grid_is_a_power_of_the_uniform_grid():
    """``t_k = (1 - k/N)^rho``: from 1 to 0, decreasing, steps packed towards the data for ``rho > 1``,
    the ``N``-step grid inside the ``2N``-step one, and ``rho = 1`` the uniform grid."""
    assert torch.equal(time_grid(4, rho=1.0), torch.linspace(1, 0, 5))
    g8, g16 = time_grid(8, dtype=torch.float64, rho=2.0), time_grid(16, dtype=torch.float64, rho=2.0)
    assert torch.allclose(g8, (1 - torch.arange(9, dtype=torch.float64) / 8) ** 2, atol=0)
    assert g8[0] == 1 and g8[-1] == 0 and bool((g8[1:] < g8[:-1]).all())
    assert torch.allclose(g16[::2], g8, atol=1e-15)
    steps = g8[:-1] - g8[1:]
    assert bool((steps[1:] < steps[:-1]).all())  # shorter steps near t = 0


def test_composition_on_a_power_grid_reproduces_the_exact_map(exact_gaussian_map, gaussian):
    noise = torch.randn(32, 3, dtype=torch.float64)
    out = sample_flow_map(exact_gaussian_map, noise, time_grid(5, dtype=torch.float64, rho=2.5))
    assert torch.allclose(out, gaussian.flow_map(noise, 1.0, 0.0), atol=1e-9)


@pytest.mark.parametrize("rho", [0.0, -1.0, float("nan"), float("inf")])
def test_time_grid_rejects_a_bad_exponent(rho):
    with pytest.raises(ValueError, match="rho"):
        time_grid(4, rho=rho)


def _assert_exact_marginal(x, gaussian, t):
    """``x`` is a sample of the Gaussian's marginal at time ``t``: standardised moments within 5 standard errors."""
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = gaussian.schedule.alpha(tt), gaussian.schedule.sigma(tt)
    z = (x - a * gaussian.means[0]) / torch.sqrt(a**2 * gaussian.stds[0] ** 2 + s**2)
    n = x.shape[0]
    assert z.mean(0).abs().max() < 5 / n**0.5, (t, z.mean(0))
    assert (z.var(0) - 1).abs().max() < 5 * (2 / n) ** 0.5, (t, z.var(0))


GRID = [1.0, 0.8, 0.45, 0.2, 0.0]


@pytest.mark.parametrize("sampler", ["consistency", "gamma"])
def test_renoising_samplers_give_exact_marginals_at_every_step(exact_gaussian_map, gaussian, sampler):
    """Jump to data and re-noise (or CTM's partial jump plus noise): with the exact map every step is
    an exact sample of the marginal at its time, for the linear and the cosine schedule."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(100_000, 3, generator=g, dtype=torch.float64)
    for k in range(2, len(GRID) + 1):
        grid = GRID[:k]
        if sampler == "consistency":
            x = sample_consistency(exact_gaussian_map, noise, grid, gaussian.schedule, g)
        else:
            x = sample_gamma(exact_gaussian_map, noise, grid, 0.6, gaussian.schedule, g)
        _assert_exact_marginal(x, gaussian, grid[-1])


def test_consistency_sampler_jumps_with_f_to_zero(exact_gaussian_map, gaussian):
    noise = torch.randn(64, 3, dtype=torch.float64)
    assert torch.allclose(sample_consistency(exact_gaussian_map, noise, 1), gaussian.flow_map(noise, 1.0, 0.0))
    # the last step of a multistep run is a jump F(x, t_{N-1}, 0) from a re-noised data sample
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_mid = sample_consistency(exact_gaussian_map, noise, [1.0, 0.5], gaussian.schedule, g1)
    final = sample_consistency(exact_gaussian_map, noise, [1.0, 0.5, 0.0], gaussian.schedule, g2)
    assert torch.allclose(final, gaussian.flow_map(x_mid, 0.5, 0.0))


def test_gamma_sampler_interpolates_composition_and_consistency(exact_gaussian_map, gaussian):
    noise = torch.randn(64, 3, dtype=torch.float64)
    assert torch.equal(sample_gamma(exact_gaussian_map, noise, 4, 0.0), sample_flow_map(exact_gaussian_map, noise, 4))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    full = sample_gamma(exact_gaussian_map, noise, 4, 1.0, gaussian.schedule, g1)
    assert torch.allclose(full, sample_consistency(exact_gaussian_map, noise, 4, gaussian.schedule, g2), atol=1e-12)


def test_time_at_noise_ratio_inverts_the_schedule(schedule):
    import math

    for ratio in (0.0, 0.01, 0.7, 3.0, 40.0):
        t = time_at_noise_ratio(schedule, ratio)
        exact = ratio / (1 + ratio) if schedule.name == "linear" else 2 / math.pi * math.atan(ratio)
        assert abs(t - exact) < 1e-12, (ratio, t, exact)


@pytest.mark.parametrize("steps", [1, 3])
def test_inversion_and_round_trip_of_the_exact_map(exact_gaussian_map, gaussian, steps):
    x0 = gaussian.sample(256, torch.Generator().manual_seed(0)).double()
    assert torch.allclose(invert(exact_gaussian_map, x0, steps), gaussian.flow_map(x0, 0.0, 1.0), atol=1e-10)
    errors = round_trip_error(exact_gaussian_map, x0, steps)
    assert errors["max"] < 1e-10 and errors["relative"] < 1e-10


def test_round_trip_error_sees_a_map_that_is_not_its_own_inverse(gaussian):
    model = exact_model(gaussian)
    with torch.no_grad():
        model.net.delta.fill_(0.05)
    x0 = gaussian.sample(256, torch.Generator().manual_seed(0)).double()
    errors = round_trip_error(model, x0, 2)
    assert errors["relative"] > 1e-3 and errors["max"] >= errors["mean"] > 0


@pytest.mark.parametrize("call,msg", [
    (lambda m, x: sample_consistency(m, x, [0.0, 1.0]), "decreasing"),
    (lambda m, x: sample_gamma(m, x, 2, gamma=1.5), "gamma"),
    (lambda m, x: sample_gamma(m, x, [0.2, 0.9]), "decreasing"),
    (lambda m, x: invert(m, x, [1.0, 0.0]), "increasing"),
])
def test_bad_sampler_arguments(exact_gaussian_map, call, msg):
    with pytest.raises(ValueError, match=msg):
        call(exact_gaussian_map, torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registered_sampler_reproduces_the_exact_map(name):
    """Driven by the sampler registry: one step is the exact ``F(eps, 1, 0)``; a deterministic sampler's
    several steps compose exact jumps into the exact map; a stochastic one gives exact data samples."""
    from flowmaps.oracle import GaussianMixture

    target = GaussianMixture([0.6, 0.4], [[-1.0, 0.5], [1.0, -0.5]], [[0.3, 0.2], [0.2, 0.4]])
    model, sampler = FlowMap(ExactAverageVelocity(target)), SAMPLERS[name]
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ones = torch.ones(4000, dtype=torch.float64)
    exact = target.flow_map(noise, ones, 0 * ones)
    if not sampler.exact_at_every_step_count:  # an ODE sampler: first-order convergence to the exact map
        errors = [float((sampler.sample(model, noise, k) - exact).norm(dim=1).mean()) for k in (64, 256)]
        assert errors[1] < 0.35 * errors[0] and errors[1] < 0.02, errors
        return
    assert torch.allclose(sampler.sample(model, noise, 1, schedule=target.schedule), exact, atol=1e-5)
    if sampler.max_steps is not None:
        with pytest.raises(ValueError, match=f"at most {sampler.max_steps} step"):
            sampler.sample(model, noise, sampler.max_steps + 1)
        return
    several = sampler.sample(model, noise, 4, schedule=target.schedule, generator=torch.Generator().manual_seed(1))
    if sampler.deterministic:
        assert torch.allclose(several, exact, atol=1e-5)
    else:
        assert_exact_samples(several, target)


def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match="unknown sampler 'magic'; choose one of"):
        get_sampler("magic")
