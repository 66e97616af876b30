"""The oracle pins the convention: its flow map satisfies the three rules and the tangent condition."""

import pytest
import torch

from flowmaps.jvp import jvp
from flowmaps.oracle import Gaussian, GaussianMixture
from flowmaps.schedules import CosineSchedule, LinearSchedule
from tests.conftest import small_mixture


def _points(n=64, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    a, b = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    return x, torch.maximum(a, b), torch.minimum(a, b), g


def test_boundary_and_composition(gaussian):
    x, s, t, g = _points()
    u = t + (s - t) * torch.rand(s.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(gaussian.flow_map(x, s, s), x, atol=1e-12)
    composed = gaussian.flow_map(gaussian.flow_map(x, s, u), u, t)
    assert torch.allclose(composed, gaussian.flow_map(x, s, t), atol=1e-10)
    # inverse direction: data -> noise -> back
    assert torch.allclose(gaussian.flow_map(gaussian.flow_map(x, t, s), s, t), x, atol=1e-10)


def test_lagrangian_rule(gaussian):
    """d/dt F(x, s, t) = v(F(x, s, t), t)."""
    x, s, t, _ = _points()
    jump, d_dt = jvp(lambda t_: gaussian.flow_map(x, s, t_), (t,), (torch.ones_like(t),))
    assert torch.allclose(d_dt, gaussian.velocity(jump, t), atol=1e-5)


def test_eulerian_rule(gaussian):
    """d/ds F(x, s, t) + grad_x F(x, s, t) . v(x, s) = 0."""
    x, s, t, _ = _points()
    v = gaussian.velocity(x, s)
    _, total = jvp(lambda x_, s_: gaussian.flow_map(x_, s_, t), (x, s), (v, torch.ones_like(s)))
    assert total.abs().max() < 1e-5


def test_tangent_condition(gaussian):
    """d/dt F(x, s, t) at t = s is v(x, s)."""
    x, s, _, _ = _points()
    _, d_dt = jvp(lambda t_: gaussian.flow_map(x, s, t_), (s.clone(),), (torch.ones_like(s),))
    assert torch.allclose(d_dt, gaussian.velocity(x, s), atol=1e-5)


def test_sign_convention_sampling_goes_noise_to_data(gaussian):
    """F(eps, 1, 0) has the data distribution: mean mu and std c (t = 0 is data)."""
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    x0 = gaussian.flow_map(eps, 1.0, 0.0)
    assert torch.allclose(x0.mean(0), gaussian.means[0], atol=0.02)
    assert torch.allclose(x0.std(0), gaussian.stds[0], rtol=0.02)


def test_mixture_velocity_matches_monte_carlo(schedule):
    """v(x, t) = E[alpha' x_0 + sigma' eps | x_t = x], estimated by self-normalised importance weights."""
    mix = small_mixture(schedule)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x0 = mix.sample(n, g).double()
    t = 0.6
    x = torch.tensor([[0.2, -0.1], [-0.8, 0.4]], dtype=torch.float64)
    a, s = schedule.alpha(torch.tensor(t)), schedule.sigma(torch.tensor(t))
    da, ds = schedule.d_alpha(torch.tensor(t)), schedule.d_sigma(torch.tensor(t))
    for xi, vi in zip(x, mix.velocity(x, t)):
        # x_t = x given x_0 fixes eps = (x - a x_0) / s; weight p(x | x_0) = N(x; a x_0, s^2)
        eps = (xi - a * x0) / s
        logw = -0.5 * (eps**2).sum(1)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * (da * x0 + ds * eps)).sum(0)
        assert torch.allclose(vi, mc, atol=2e-2), (vi, mc)


def test_mixture_denoiser_consistent_with_velocity(schedule):
    mix = small_mixture(schedule)
    x = torch.randn(10, 2, dtype=torch.float64)
    t = torch.full((10,), 0.4, dtype=torch.float64)
    assert torch.allclose(schedule.denoiser_to_velocity(mix.denoiser(x, t), x, t), mix.velocity(x, t), atol=1e-10)


def test_single_component_mixture_flow_map_matches_closed_form(schedule):
    closed = Gaussian([0.5, -1.0], [0.3, 1.5], schedule=schedule)
    integrated = GaussianMixture([1.0], [[0.5, -1.0]], [[0.3, 1.5]], schedule=schedule)
    x, s, t, _ = _points(32, 2)
    assert torch.allclose(integrated.flow_map(x, s, t), closed.flow_map(x, s, t), atol=1e-7)


def test_mixture_flow_map_rules():
    mix = small_mixture()
    x, s, t, g = _points(32, 2)
    u = t + (s - t) * torch.rand(s.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(mix.flow_map(mix.flow_map(x, s, u), u, t), mix.flow_map(x, s, t), atol=1e-6)
    jump, d_dt = jvp(lambda t_: mix.flow_map(x, s, t_), (t,), (torch.ones_like(t),), backend="finite_difference",
                     fd_step=1e-5)
    assert torch.allclose(d_dt, mix.velocity(jump, t), atol=1e-5)


def test_mixture_flow_map_transports_marginals():
    """Exact samples at s = 0.9 pushed to t = 0.2 match exact samples at t = 0.2 (energy distance)."""
    from flowmaps.metrics import energy_distance

    mix = small_mixture()
    g = torch.Generator().manual_seed(3)
    xs = mix.sample_xt(3000, 0.9, g).double()
    moved = mix.flow_map(xs, 0.9, 0.2)
    ref = mix.sample_xt(3000, 0.2, g).double()
    wrong = mix.flow_map(xs, 0.9, 0.6)
    assert energy_distance(moved, ref) < 0.01
    assert energy_distance(wrong, ref) > 5 * max(energy_distance(moved, ref), 0.005)


def test_bad_mixture_spec():
    with pytest.raises(ValueError, match="weights must be positive"):
        GaussianMixture([-1.0, 2.0], [[0.0], [1.0]], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="standard deviations must be positive"):
        GaussianMixture([1.0], [[0.0, 1.0]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="shape"):
        GaussianMixture([1.0, 1.0], [[0.0, 1.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="must lie in"):
        small_mixture().flow_map(torch.zeros(2, 2), 1.5, 0.0)


def test_mixture_flow_map_three_rules_under_each_schedule(schedule):
    """Compositional, Lagrangian and Eulerian residuals vanish for the integrated mixture map."""
    mix = small_mixture(schedule)
    x, s, t, g = _points(16, 2, seed=4)
    u = t + (s - t) * torch.rand(s.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(mix.flow_map(mix.flow_map(x, s, u), u, t), mix.flow_map(x, s, t), atol=1e-6)
    jump, d_dt = jvp(lambda t_: mix.flow_map(x, s, t_), (t,), (torch.ones_like(t),), backend="finite_difference",
                     fd_step=1e-5)
    assert torch.allclose(d_dt, mix.velocity(jump, t), atol=1e-5)
    # Eulerian: d/ds F(x, s, t) + grad_x F . v(x, s) = 0, along the tangent (v(x, s), 1, 0)
    _, total = jvp(lambda x_, s_: mix.flow_map(x_, s_, t), (x, s), (mix.velocity(x, s), torch.ones_like(s)),
                   backend="finite_difference", fd_step=1e-5)
    assert total.abs().max() < 1e-5


def test_mixture_flow_map_transports_marginals_under_cosine_schedule():
    from flowmaps.metrics import energy_distance
    from flowmaps.schedules import CosineSchedule

    mix = small_mixture(CosineSchedule())
    g = torch.Generator().manual_seed(5)
    moved = mix.flow_map(mix.sample_xt(2000, 1.0, g).double(), 1.0, 0.0)
    ref = mix.sample(2000, g).double()
    assert energy_distance(moved, ref) < 0.01
    # the linear schedule's map from the same noise lands elsewhere: the schedule matters
    wrong = mix.with_schedule(LinearSchedule()).flow_map(mix.sample_xt(2000, 0.5, g).double(), 0.5, 0.0)
    right = mix.flow_map(mix.sample_xt(2000, 0.5, g).double(), 0.5, 0.0)
    assert energy_distance(wrong, ref) > 3 * energy_distance(right, ref)


def test_with_schedule_keeps_the_data_and_changes_the_path():
    from flowmaps.schedules import CosineSchedule

    mix = small_mixture()
    cos = mix.with_schedule(CosineSchedule())
    assert isinstance(cos.schedule, CosineSchedule) and torch.equal(cos.means, mix.means)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(cos.velocity(x, 0.5), small_mixture(CosineSchedule()).velocity(x, 0.5))
    assert not torch.allclose(cos.velocity(x, 0.5), mix.velocity(x, 0.5))
    gauss = Gaussian([0.5], [0.3]).with_schedule(CosineSchedule())
    assert isinstance(gauss, Gaussian) and isinstance(gauss.schedule, CosineSchedule)


def test_exact_average_velocity_diagonal_and_off_diagonal():
    from flowmaps.flow_map import FlowMap
    from flowmaps.oracle import ExactAverageVelocity

    mix = small_mixture()
    model = FlowMap(ExactAverageVelocity(mix))
    x = torch.randn(6, 2, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64)
    assert torch.allclose(model.velocity(x, t), mix.velocity(x, t))
    assert torch.allclose(model(x, 0.9, 0.1), mix.flow_map(x, 0.9, 0.1), atol=1e-10)


def labelled_mixture(schedule=None) -> GaussianMixture:
    """Three components in two classes: class 0 holds components 0 and 2, class 1 only component 1."""
    return GaussianMixture([0.2, 0.5, 0.3], [[-1.0, 0.5], [1.0, -0.5], [0.5, 1.5]],
                           [[0.3, 0.2], [0.25, 0.4], [0.5, 0.3]], schedule=schedule, labels=[0, 1, 0])


def test_conditional_mixture_keeps_the_class_components_with_renormalised_weights():
    mix = labelled_mixture()
    assert mix.num_classes == 2 and mix.labels.tolist() == [0, 1, 0]
    zero, one = mix.conditional(0), mix.conditional(1)
    assert torch.allclose(zero.weights, torch.tensor([0.4, 0.6], dtype=torch.float64))
    assert torch.equal(zero.means, mix.means[[0, 2]]) and torch.equal(zero.stds, mix.stds[[0, 2]])
    assert one.weights.tolist() == [1.0] and zero.labels is None and zero.num_classes == 0
    assert mix.with_schedule(CosineSchedule()).labels.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"class 2 is out of range: this mixture's classes are 0 .. 1"):
        mix.conditional(2)
    with pytest.raises(ValueError, match="class -1 is out of range"):
        mix.conditional(-1)
    with pytest.raises(ValueError, match="this mixture has no labels"):
        small_mixture().conditional(0)


def test_conditional_velocity_row_by_row_and_null_rows_unconditional(schedule):
    mix = labelled_mixture(schedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 2, generator=g, dtype=torch.float64)
    t = torch.rand(9, generator=g, dtype=torch.float64)
    cond = torch.tensor([0, 1, -1, 1, 0, -1, 0, 1, -1])
    v = mix.velocity(x, t, cond)
    f = mix.denoiser(x, t, cond)
    for c, reference in ((0, mix.conditional(0)), (1, mix.conditional(1)), (-1, mix)):
        rows = cond == c
        assert torch.allclose(v[rows], reference.velocity(x[rows], t[rows]), atol=1e-12)
        assert torch.allclose(f[rows], reference.denoiser(x[rows], t[rows]), atol=1e-12)
    assert torch.equal(mix.velocity(x, t, torch.full((9,), -1)), mix.velocity(x, t))
    assert not torch.allclose(mix.velocity(x, t, torch.zeros(9, dtype=torch.long)), mix.velocity(x, t))


def test_single_component_class_matches_the_gaussian_closed_form(schedule):
    """Class 1 is one Gaussian: its conditional velocity and flow map are the closed-form ones."""
    mix = labelled_mixture(schedule)
    closed = Gaussian(mix.means[1], mix.stds[1], schedule=schedule)
    x, s, t, _ = _points(16, 2, seed=2)
    ones = torch.ones(16, dtype=torch.long)
    assert torch.allclose(mix.velocity(x, t, ones), closed.velocity(x, t), atol=1e-12)
    assert torch.allclose(mix.flow_map(x, s, t, ones), closed.flow_map(x, s, t), atol=1e-7)


def test_conditional_flow_map_solves_the_conditional_ode():
    """Per row the map is class cond[i]'s (-1: the unconditional one), and d/dt F(x, s, t, c) = v(F, t, c)."""
    mix = labelled_mixture()
    x, s, t, _ = _points(12, 2, seed=3)
    cond = torch.tensor([0, 1, -1] * 4)
    moved = mix.flow_map(x, s, t, cond)
    for c, reference in ((0, mix.conditional(0)), (1, mix.conditional(1)), (-1, mix)):
        rows = cond == c
        assert torch.allclose(moved[rows], reference.flow_map(x[rows], s[rows], t[rows]), atol=1e-7)
    jump, d_dt = jvp(lambda t_: mix.flow_map(x, s, t_, cond), (t,), (torch.ones_like(t),),
                     backend="finite_difference", fd_step=1e-5)
    assert torch.allclose(d_dt, mix.velocity(jump, t, cond), atol=1e-5)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guided_velocity_is_its_definition_from_the_two_closed_forms(schedule, w):
    """``v_w = v(x, t, None) + w (v(x, t, c) - v(x, t, None))`` (spec §7): ``w = 1`` the conditional
    velocity, ``w = 0`` the unconditional one; rows without a label stay unconditional."""
    mix = labelled_mixture(schedule)
    x, _, t, _ = _points(12, 2, seed=4)
    cond = torch.tensor([0, 1, -1] * 4)
    unconditional, conditional = mix.velocity(x, t), mix.velocity(x, t, cond)
    guided = mix.velocity(x, t, cond, guidance=w)
    assert torch.allclose(guided, unconditional + w * (conditional - unconditional), atol=1e-12)
    assert torch.allclose(guided[cond == -1], unconditional[cond == -1], atol=1e-12)
    per_row = mix.velocity(x, t, cond, guidance=torch.full((12,), w, dtype=torch.float64))
    assert torch.equal(per_row, guided)


def test_guided_flow_map_solves_the_guided_ode_and_guides_away_from_the_other_class():
    """``d/dt F_w(x, s, t, c) = v_w(F_w, t, c)``; ``F_1`` is the conditional map; at ``w = 3`` one step
    from noise lands farther from class 1's mean than the conditional map does (for class 0)."""
    mix = labelled_mixture()
    x, s, t, _ = _points(12, 2, seed=5)
    cond = torch.tensor([0, 1, -1] * 4)
    assert torch.allclose(mix.flow_map(x, s, t, cond, guidance=1.0), mix.flow_map(x, s, t, cond), atol=1e-9)
    jump, d_dt = jvp(lambda t_: mix.flow_map(x, s, t_, cond, guidance=3.0), (t,), (torch.ones_like(t),),
                     backend="finite_difference", fd_step=1e-5)
    assert torch.allclose(d_dt, mix.velocity(jump, t, cond, guidance=3.0), atol=1e-5)
    eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zeros = torch.zeros(2000, dtype=torch.long)
    other = mix.means[1]
    plain = (mix.flow_map(eps, 1.0, 0.0, zeros) - other).norm(dim=1).mean()
    guided = (mix.flow_map(eps, 1.0, 0.0, zeros, guidance=3.0) - other).norm(dim=1).mean()
    assert guided > plain + 0.1, (guided, plain)


def test_bad_guidance_is_named():
    mix = labelled_mixture()
    x, _, t, _ = _points(3, 2, seed=6)
    cond = torch.tensor([0, 1, 0])
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance scale w must be finite and >= 0"):
            mix.velocity(x, t, cond, guidance=w)
    with pytest.raises(ValueError, match="guidance needs class labels"):
        mix.velocity(x, t, None, guidance=2.0)
    with pytest.raises(ValueError, match="guidance needs class labels"):
        small_mixture().flow_map(x, 1.0, 0.0, None, guidance=2.0)


def test_labelled_samples_carry_their_components_class_and_draw_the_same_x():
    mix = GaussianMixture([1, 1, 2], [[-4.0], [4.0], [8.0]], [[0.1]] * 3, labels=[1, 0, 0])
    plain = mix.sample(3000, torch.Generator().manual_seed(0))
    x, labels = mix.sample(3000, torch.Generator().manual_seed(0), return_labels=True)
    assert torch.equal(x, plain) and labels.dtype == torch.int64 and labels.shape == (3000,)
    assert torch.equal(labels, (x[:, 0] < 0).long())  # the component at -4 is class 1
    with pytest.raises(ValueError, match="return_labels=True needs a labelled mixture"):
        small_mixture().sample(3, return_labels=True)


def test_bad_labels_and_conditions_are_named():
    means, stds = [[0.0], [1.0]], [[1.0], [1.0]]
    with pytest.raises(ValueError, match="labels must be integers"):
        GaussianMixture([1, 1], means, stds, labels=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"labels must have shape \[K\] = \[2\]"):
        GaussianMixture([1, 1], means, stds, labels=[0])
    with pytest.raises(ValueError, match="labels must be >= 0; component 1 has label -1"):
        GaussianMixture([1, 1], means, stds, labels=[0, -1])
    with pytest.raises(ValueError, match=r"class\(es\) \[0\] have no component"):
        GaussianMixture([1, 1], means, stds, labels=[1, 1])
    mix, x = labelled_mixture(), torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cond\[1\] = 2 is not a class of this mixture \(its classes are 0 .. 1\)"):
        mix.velocity(x, 0.5, torch.tensor([0, 2, -1]))
    with pytest.raises(ValueError, match=r"cond\[0\] = -2 is not a class"):
        mix.flow_map(x, 0.9, 0.1, torch.tensor([-2, 0, 0]))
    with pytest.raises(ValueError, match=r"cond must be a \[B\] = \[3\] integer tensor"):
        mix.velocity(x, 0.5, torch.zeros(3))
    with pytest.raises(ValueError, match=r"cond\[0\] = 0 is not a class of this mixture \(it has no labels\)"):
        small_mixture().velocity(torch.zeros(3, 2), 0.5, torch.tensor([0, -1, -1]))
    with pytest.raises(ValueError, match="it has no labels"):
        Gaussian([0.0], [1.0]).flow_map(torch.zeros(2, 1), 0.9, 0.1, torch.tensor([0, 0]))


def test_exact_average_velocity_and_teacher_pass_the_condition_and_any_shape():
    from flowmaps.flow_map import FlowMap
    from flowmaps.oracle import ExactAverageVelocity
    from flowmaps.teachers import ExactTeacher

    mix = GaussianMixture([1, 1], [[0.0] * 4, [1.0] * 4], [[0.5] * 4] * 2, labels=[0, 1])
    cond = torch.tensor([0, 1, -1, 1])
    x = torch.randn(4, 4, dtype=torch.float64)
    t = torch.full((4,), 0.3, dtype=torch.float64)
    model = FlowMap(ExactAverageVelocity(mix))
    assert torch.allclose(model.velocity(x, t, cond), mix.velocity(x, t, cond))
    assert torch.allclose(model(x, 0.9, 0.1, cond), mix.flow_map(x, 0.9, 0.1, cond), atol=1e-10)
    teacher = ExactTeacher(mix)
    images = x.reshape(4, 1, 2, 2)
    s = torch.full((4,), 0.9, dtype=torch.float64)
    assert torch.allclose(teacher.velocity(images, t, cond), mix.velocity(x, t, cond).reshape(4, 1, 2, 2))
    jumped = teacher.flow_map(images, s, t, cond)
    assert jumped.shape == (4, 1, 2, 2)
    assert torch.allclose(jumped.reshape(4, 4), mix.flow_map(x, s, t, cond), atol=1e-5)
