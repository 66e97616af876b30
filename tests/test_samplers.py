import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.oracle import ExactAverageVelocity
from flowmaps.samplers import as_grid, sample_flow_map, sample_ode, time_grid
from tests.conftest import small_mixture


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
