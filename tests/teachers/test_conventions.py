"""Teachers in other conventions (spec §8): an exact Gaussian-mixture teacher written in each foreign
path and prediction type, adapted back, is our exact velocity.

The foreign teacher is built from the mixture's closed forms in the linear convention: at the teacher's
time ``tau`` its path gives ``a, b``, the state ``x_T = a x_0 + b eps`` is the linear path's
``x_lin = x_T / (a + b)`` at ``t_lin = b / (a + b)``, where the mixture's denoiser is ``x0_hat`` and
``eps_hat = x0_hat + v`` (``v = eps - x_0``); the prediction type writes its output from those. Every
registered path is crossed with every registered prediction type, so a new one is tested here as it is
added; a pairing a path cannot take (a flow output on a path without a flow time) must be refused.
"""

import logging
import math

import pytest
import torch

from flowmaps.oracle import GaussianMixture
from flowmaps.schedules import SCHEDULES, LinearSchedule
from flowmaps.teachers import VelocityTeacher
from flowmaps.teachers.conventions import (
    PATHS, PREDICTIONS, Coefficients, ConventionTeacher, DiscreteVPPath, EDMPreconditioning, ddpm_betas, get_path,
)

MIXTURE = GaussianMixture([0.3, 0.5, 0.2], [[-1.0, 0.5], [1.0, -0.5], [0.2, 1.5]],
                          [[0.3, 0.2], [0.25, 0.4], [0.5, 0.35]], labels=[0, 1, 1])
# fractions of the teacher's exact range of our times: its ends and points near them
FRACTIONS = (0.0, 1e-4, 0.01, 0.25, 0.5, 0.75, 0.99, 1 - 1e-4, 1.0)


def foreign_teacher(path, prediction, mixture: GaussianMixture = MIXTURE):
    """``fn(x_T, tau, cond)``: the mixture's exact ``prediction`` on ``path`` at the teacher's time ``tau``."""
    linear = mixture.with_schedule(LinearSchedule())

    def fn(x_T, tau, cond):
        a, b = path.coefficients(tau)
        x_lin, t_lin = x_T / (a + b)[:, None], b / (a + b)
        x0 = linear.denoiser(x_lin, t_lin, cond)
        eps = x0 + linear.velocity(x_lin, t_lin, cond)
        da, db = path.flow_coefficients(tau) if prediction.needs_flow else (None, None)
        return prediction.encode(x0, eps, Coefficients(*(None if v is None else v[:, None] for v in (a, b, da, db))))

    return fn


def times_in(teacher: ConventionTeacher) -> torch.Tensor:
    """Our times across the teacher's exact range, its ends included unless they are 0 or 1 (where a
    noise or data prediction is 0 / 0)."""
    lo, hi = teacher.exact_range
    t = torch.tensor([lo + f * (hi - lo) for f in FRACTIONS], dtype=torch.float64)
    return t[(t > 0) & (t < 1)]


def states(schedule, t: torch.Tensor, per_time: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_time`` samples of our marginal at each time: ``(x, t)``, both float64."""
    gen = torch.Generator().manual_seed(0)
    tt = t.repeat_interleave(per_time)
    x0 = MIXTURE.sample(tt.numel(), gen).double()
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    return schedule.sample_xt(x0, eps, tt), tt


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("prediction_name", sorted(PREDICTIONS))
@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_exact_teacher_in_a_foreign_convention_adapts_to_our_exact_velocity(path_name, prediction_name,
                                                                           schedule_name):
    path, prediction, schedule = get_path(path_name), PREDICTIONS[prediction_name], SCHEDULES[schedule_name]()
    if prediction.needs_flow and path.flow_time is None:
        with pytest.raises(ValueError, match="needs a path with a flow time"):
            ConventionTeacher(foreign_teacher(path, prediction), path, prediction_name, schedule)
        return
    teacher = ConventionTeacher(foreign_teacher(path, prediction), path, prediction_name, schedule)
    x, t = states(schedule, times_in(teacher))
    expected = MIXTURE.with_schedule(schedule).velocity(x, t)
    assert torch.allclose(teacher.velocity(x, t), expected, rtol=1e-6, atol=1e-6), (
        (teacher.velocity(x, t) - expected).abs().max())


def test_teacher_time_in_closed_form():
    """Linear schedule: rectified flow's timestep is ``1000 t``, flow_matching's time ``1 - t``, EDM's
    noise level ``t / (1 - t)``; a DDPM timestep ``k`` is our ``t = b / (a + b)`` and maps back to ``k``."""
    t = torch.tensor([0.01, 0.3, 0.7, 0.98], dtype=torch.float64)

    def teacher(name: str) -> ConventionTeacher:
        return ConventionTeacher(lambda x, tau, cond: x, name, "epsilon")

    assert torch.allclose(teacher("rectified_flow").teacher_time(t), 1000 * t, rtol=1e-12)
    assert torch.allclose(teacher("flow_matching").teacher_time(t), 1 - t, rtol=1e-12)
    assert torch.allclose(teacher("edm").teacher_time(t), t / (1 - t), rtol=1e-12)
    vp = teacher("vp_linear")
    k = torch.tensor([0.0, 1.0, 17.0, 500.0, 998.0, 999.0], dtype=torch.float64)
    abar = torch.cumprod(1 - ddpm_betas("linear"), 0)[k.long()]
    ours = vp.our_time(k)
    assert torch.allclose(ours, (1 - abar).sqrt() / (abar.sqrt() + (1 - abar).sqrt()), rtol=1e-12)
    assert torch.allclose(vp.teacher_time(ours), k, atol=1e-8)
    half = torch.tensor(17.5, dtype=torch.float64)  # a fractional timestep: the log-SNR halfway between 17 and 18
    assert float(vp.path.log_snr(half)) == pytest.approx(float(vp.path.table[17:19].mean()), rel=1e-14)
    assert float(vp.teacher_time(vp.our_time(half))) == pytest.approx(17.5, abs=1e-8)
    assert vp.exact_range == pytest.approx((float(ours[0]), float(ours[-1])), rel=1e-12)
    assert torch.allclose(vp.state_scale(ours), abar.sqrt() / (1 - ours), rtol=1e-12)


def test_times_outside_the_teachers_range_are_clamped_and_logged(caplog):
    teacher = ConventionTeacher(lambda x, tau, cond: x, "vp_linear", "epsilon")
    with caplog.at_level(logging.WARNING, logger="flowmaps.teachers"):
        assert teacher.teacher_time(0.0) == 0 and teacher.teacher_time(1.0) == pytest.approx(999, abs=1e-9)
        assert teacher.teacher_time(torch.tensor([1e-3, 0.5])).shape == (2,)
    assert len(caplog.records) == 1 and "clamped" in caplog.records[0].getMessage()
    edm = ConventionTeacher(lambda x, tau, cond: x, "edm", "sample")
    assert edm.teacher_time(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.002, 80.0])
    v = edm.velocity(torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(v).all()


def test_beta_schedules_written_out():
    """diffusers' definitions, element by element (1000 steps; cosine capped at 0.999)."""
    n = 1000
    linear = [1e-4 + (0.02 - 1e-4) * i / (n - 1) for i in range(n)]
    scaled = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / (n - 1)) ** 2 for i in range(n)]

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    cosine = [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
    assert torch.allclose(ddpm_betas("linear"), torch.tensor(linear, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(ddpm_betas("scaled_linear", beta_start=0.00085, beta_end=0.012),
                          torch.tensor(scaled, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(ddpm_betas("squaredcos_cap_v2"), torch.tensor(cosine, dtype=torch.float64), rtol=1e-12)
    assert ddpm_betas("squaredcos_cap_v2")[-1] == 0.999


def test_prediction_types_follow_the_spec_formulas():
    """On a VP point (``a^2 + b^2 = 1``): eps, x_0, ``v = a eps - b x_0``; on rectified flow ``eps - x_0``."""
    x0, eps = torch.randn(2, 4, 3, dtype=torch.float64)
    a, b = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    vp = Coefficients(a, b)
    assert torch.equal(PREDICTIONS["epsilon"].encode(x0, eps, vp), eps)
    assert torch.equal(PREDICTIONS["sample"].encode(x0, eps, vp), x0)
    assert torch.allclose(PREDICTIONS["v_prediction"].encode(x0, eps, vp), a * eps - b * x0)
    rf_path, fm_path, tau = get_path("rectified_flow"), get_path("flow_matching"), torch.tensor([300.0])
    rf = Coefficients(*rf_path.coefficients(tau), *rf_path.flow_coefficients(tau))
    assert torch.allclose(torch.stack(rf), torch.tensor([[0.7], [0.3], [-1.0], [1.0]], dtype=torch.float64))
    assert torch.allclose(PREDICTIONS["flow"].encode(x0, eps, rf), eps - x0)
    fm = Coefficients(*fm_path.coefficients(tau / 1000), *fm_path.flow_coefficients(tau / 1000))
    assert torch.allclose(torch.stack(fm), torch.tensor([[0.3], [0.7], [1.0], [-1.0]], dtype=torch.float64))
    assert torch.allclose(PREDICTIONS["flow"].encode(x0, eps, fm), x0 - eps)
    for name, prediction in PREDICTIONS.items():
        c = rf if prediction.needs_flow else vp
        x = c.a * x0 + c.b * eps
        back = prediction.decode(prediction.encode(x0, eps, c), x, c)
        assert torch.allclose(back[0], x0) and torch.allclose(back[1], eps), name


def test_flow_matching_teacher_agrees_with_the_time_reversed_velocity_teacher():
    """facebookresearch/flow_matching's velocity ``u(x, t')`` is ``VelocityTeacher(u, time_reversed=True)``
    (linear schedule), an independent statement of the same convention."""
    linear = MIXTURE.with_schedule(LinearSchedule())

    def u(x, t_prime):
        return -linear.velocity(x, 1 - t_prime)

    x, t = states(LinearSchedule(), torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64))
    adapted = ConventionTeacher(lambda x, tau, cond: u(x, tau), "flow_matching", "flow").velocity(x, t)
    assert torch.allclose(adapted, VelocityTeacher(u, time_reversed=True).velocity(x, t), rtol=1e-9, atol=1e-9)
    assert torch.allclose(adapted, MIXTURE.velocity(x, t), rtol=1e-9, atol=1e-9)


def test_edm_preconditioning_around_a_raw_network():
    """A raw ``F`` such that ``c_skip x + c_out F(c_in x, c_noise)`` is the exact denoiser gives the exact velocity."""
    sd = 0.5
    linear = MIXTURE.with_schedule(LinearSchedule())

    def raw(x_in, c_noise, cond):
        sigma = torch.exp(4 * c_noise)[:, None]
        x = x_in * torch.sqrt(sigma**2 + sd**2)
        denoised = linear.denoiser(x / (1 + sigma), (sigma / (1 + sigma))[:, 0])
        return (denoised - sd**2 / (sigma**2 + sd**2) * x) / (sigma * sd / torch.sqrt(sigma**2 + sd**2))

    teacher = ConventionTeacher(EDMPreconditioning(raw, sd), "edm", "sample")
    x, t = states(LinearSchedule(), times_in(teacher))
    assert torch.allclose(teacher.velocity(x, t), MIXTURE.velocity(x, t), rtol=1e-6, atol=1e-6)


def test_class_labels_pass_through_and_the_velocity_is_differentiable_in_x():
    path, prediction = get_path("vp_cosine"), PREDICTIONS["v_prediction"]
    teacher = ConventionTeacher(foreign_teacher(path, prediction), path, "v_prediction")
    x, t = states(LinearSchedule(), torch.tensor([0.2, 0.6], dtype=torch.float64), per_time=3)
    cond = torch.tensor([0, 1, -1, 1, 0, -1])
    x.requires_grad_(True)
    v = teacher.velocity(x, t, cond)
    assert torch.allclose(v, MIXTURE.velocity(x, t, cond), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(v.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bad_input_is_a_named_error():
    def identity(x, tau, cond):
        return x

    with pytest.raises(ValueError, match="unknown prediction type 'x0'"):
        ConventionTeacher(identity, "vp_linear", "x0")
    with pytest.raises(ValueError, match="unknown teacher path 'ddpm'"):
        ConventionTeacher(identity, "ddpm", "epsilon")
    with pytest.raises(ValueError, match="needs a path with a flow time"):
        ConventionTeacher(identity, "edm", "flow")
    with pytest.raises(TypeError, match="needs a callable"):
        ConventionTeacher(3, "edm", "sample")
    teacher = ConventionTeacher(identity, "rectified_flow", "flow")
    for t in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            teacher.velocity(torch.zeros(2, 2), t)
    with pytest.raises(ValueError, match=r"timestep lies in \[0, 1000\]"):
        teacher.our_time(1001.0)
    with pytest.raises(ValueError, match="teacher returned shape"):
        ConventionTeacher(lambda x, tau, cond: x[:, :1], "edm", "sample").velocity(torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError, match="decrease strictly"):
        DiscreteVPPath([0.9, 0.9, 0.5])
    with pytest.raises(ValueError, match="values in"):
        DiscreteVPPath([0.9, 0.5, 0.0])
    with pytest.raises(ValueError, match="unknown beta schedule"):
        ddpm_betas("quadratic")
