import torch

from flowmaps.schedules import LinearSchedule, get_schedule
import pytest


def test_endpoints(schedule):
    t = torch.tensor([0.0, 1.0])
    assert torch.allclose(schedule.alpha(t), torch.tensor([1.0, 0.0]), atol=1e-7)
    assert torch.allclose(schedule.sigma(t), torch.tensor([0.0, 1.0]), atol=1e-7)


def test_derivatives_match_finite_differences(schedule):
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    for f, df in [(schedule.alpha, schedule.d_alpha), (schedule.sigma, schedule.d_sigma)]:
        assert torch.allclose(df(t), (f(t + h) - f(t - h)) / (2 * h), atol=1e-6)


def test_linear_conditional_velocity_is_eps_minus_x0():
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    v = LinearSchedule().conditional_velocity(x0, eps, torch.rand(5))
    assert torch.allclose(v, eps - x0)


def test_conversions_round_trip(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x = schedule.sample_xt(x0, eps, t)
    v = schedule.conditional_velocity(x0, eps, t)
    assert torch.allclose(schedule.velocity_to_denoiser(v, x, t), x0)
    assert torch.allclose(schedule.velocity_to_noise(v, x, t), eps)
    assert torch.allclose(schedule.denoiser_to_velocity(x0, x, t), v)
    assert torch.allclose(schedule.noise_to_velocity(eps, x, t), v)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'foo'"):
        get_schedule("foo")
