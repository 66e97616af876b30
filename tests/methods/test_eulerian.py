"""Eulerian methods at the exact Gaussian flow map: residuals vanish (or the conditional losses are
stationary), wrong conventions are rejected, and away from the exact map the update points back."""

import pytest
import torch

from flowmaps.jvp import flow_jvp
from flowmaps.methods import build_method, get_method_class
from flowmaps.teachers import ExactTeacher
from tests.methods.exact_checks import (
    assert_rejects, assert_restoring, assert_stationary, assert_vanishes, loss_and_grad,
)
from tests.methods.exact_models import exact_model

CASES = {
    "emd": dict(term="eulerian"),
    "esd": dict(term="eulerian", options=dict(diagonal_fraction=0.0)),
    "ayf-emd": dict(term="eulerian"),
    # the model's own velocity and a tiny finite-difference step: O(step) residual
    "soflow": dict(term="eulerian", options=dict(diagonal_fraction=0.0, velocity="self", step_start=1e-4,
                                                  step_end=1e-4, adaptive_p=0.0), tol=1e-8, grad_tol=1e-3),
    "meanflow": dict(term="meanflow"),
    "imf": dict(term="imf"),
}


def make(name, target, exact_options=True, **options):
    """The method with the options of ``CASES`` (``exact_options``) or its paper defaults."""
    teacher = ExactTeacher(target) if get_method_class(name).needs_teacher else None
    base = CASES[name].get("options", {}) if exact_options else {}
    return build_method(name, target.schedule, teacher=teacher, **{**base, **options})


@pytest.mark.parametrize("name", ["emd", "esd", "ayf-emd", "soflow"])
def test_residual_and_gradient_vanish_at_exact_map(gaussian, name):
    case = CASES[name]
    assert_vanishes(make(name, gaussian), gaussian, case["term"], case.get("tol", 1e-10), case.get("grad_tol", 1e-6))


@pytest.mark.parametrize("name,options", [
    ("meanflow", {}), ("meanflow", dict(preset="imagenet")), ("meanflow", dict(preset="cifar10")),
    ("imf", {}), ("imf", dict(preset="paper")),
    ("soflow", dict(velocity="conditional", step_start=0.01, step_end=0.01)),
    ("esd", dict(diagonal_fraction=1.0)),
])
def test_conditional_losses_are_stationary_at_exact_map(gaussian, name, options):
    """Marginal-from-conditional losses: the gradient at the exact map is Monte-Carlo noise. (The
    adaptive weight keeps this only because the Gaussian's conditional residual is symmetric.)"""
    grad_exact, _ = assert_stationary(make(name, gaussian, **options), gaussian)
    assert abs(grad_exact) < 0.05


@pytest.mark.parametrize("name", list(CASES))
def test_sign_flipped_map_is_rejected(gaussian, name):
    assert_rejects(make(name, gaussian), gaussian, CASES[name]["term"], "sign_flipped")


@pytest.mark.parametrize("name", ["emd", "ayf-emd", "meanflow", "imf"])
def test_time_reversed_convention_is_rejected(gaussian, name):
    """Only a teacher or the conditional velocity ties the map to the data's direction of time."""
    _, grad = loss_and_grad(make(name, gaussian), exact_model(gaussian, "time_reversed"), gaussian, n=20000)
    if get_method_class(name).needs_teacher:
        assert_rejects(make(name, gaussian), gaussian, CASES[name]["term"], "time_reversed")
    else:
        assert abs(grad) > 0.1


@pytest.mark.parametrize("name", list(CASES))
def test_update_points_back_to_the_exact_map(gaussian, name):
    """With the paper defaults (a consistency term alone, without the diagonal that anchors it, need
    not be monotone along one perturbation direction)."""
    assert_restoring(make(name, gaussian, exact_options=False), gaussian, n=20000)


def test_soflow_conditional_velocity_points_back_to_the_exact_map(gaussian):
    assert_restoring(make("soflow", gaussian, velocity="conditional", step_start=0.01, step_end=0.01), gaussian,
                     n=20000)


def test_eulerian_identities_hold_at_the_exact_map_with_the_stated_signs(exact_gaussian_map, gaussian):
    """``V = v + (t - s) D`` (MeanFlow) and ``v = V - (t - s) D`` (iMF), ``D = d_s V + grad_x V . v``;
    the opposite sign of ``(t - s)`` fails."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    s = 0.2 + 0.8 * torch.rand(64, generator=g, dtype=torch.float64)
    t = s * torch.rand(64, generator=g, dtype=torch.float64)
    v = gaussian.velocity(x, s)
    avg, d = flow_jvp(exact_gaussian_map, x, s, t, dx=v, ds=1.0, output="V", grad="none")
    gap = (t - s)[:, None]
    assert torch.allclose(avg, v + gap * d, atol=1e-9)
    assert not torch.allclose(avg, v - gap * d, atol=1e-2)


def test_soflow_step_shrinks_geometrically(gaussian):
    method = make("soflow", gaussian, step_start=0.2, step_end=0.002)
    assert method.step_fraction(0.0) == pytest.approx(0.2)
    assert method.step_fraction(0.5) == pytest.approx(0.02)
    assert method.step_fraction(1.0) == pytest.approx(0.002)


def test_meanflow_presets_and_explicit_options():
    from flowmaps.schedules import LinearSchedule

    cifar = build_method("meanflow", LinearSchedule(), preset="cifar10")
    assert cifar.pairs.diagonal_fraction == 0.25 and cifar.weighting.adaptive_p == 0.75
    assert cifar.pairs.logit_mean == (-0.6, -4.0)
    explicit = build_method("meanflow", LinearSchedule(), preset="cifar10", adaptive_p=0.5)
    assert explicit.weighting.adaptive_p == 0.5
    with pytest.raises(ValueError, match="has no preset 'cifar'"):
        build_method("meanflow", LinearSchedule(), preset="cifar")


def test_teacher_methods_refuse_to_start_without_a_teacher(gaussian):
    for name in ["emd", "ayf-emd"]:
        with pytest.raises(ValueError, match="--teacher RUN_DIR"):
            build_method(name, gaussian.schedule)


@pytest.mark.parametrize("name,options,message", [
    ("esd", dict(jvp_backend="nope"), "jvp_backend of method 'esd'"),
    ("ayf-emd", dict(tangent_norm_c=-0.1), "tangent_norm_c"),
    ("soflow", dict(velocity="teacher"), "velocity of method 'soflow'"),
    ("soflow", dict(step_start=0.01, step_end=0.1), "step_end <= step_start"),
    ("meanflow", dict(reduction="max"), "reduction of method .meanflow. must be one of"),
    ("imf", dict(adaptive_c=0.0), "adaptive_c"),
    ("imf", dict(diagonal_fraction=1.5), "diagonal_fraction"),
])
def test_bad_options_are_named(gaussian, name, options, message):
    teacher = ExactTeacher(gaussian) if get_method_class(name).needs_teacher else None
    with pytest.raises(ValueError, match=message):
        build_method(name, gaussian.schedule, teacher=teacher, **options)
