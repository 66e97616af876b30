"""Guided teachers (``flowmaps.teachers.guidance``) against the exact guided oracle (spec §7)."""

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.nets import MLP
from flowmaps.oracle import GaussianMixture
from flowmaps.teachers import ExactTeacher, FlowMapTeacher, GuidedTeacher

MIX = GaussianMixture([0.3, 0.3, 0.4], [[-1.5, 0.0], [0.0, 1.5], [1.2, -0.6]], [0.3, 0.3, 0.35], labels=[0, 0, 1])


class LearnedLike:
    """The exact velocity behind the interface of a learned teacher (no exact flow map to delegate to)."""

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture

    def velocity(self, x, t, cond=None):
        return self.mixture.velocity(x, t, cond)


class Unconditional(LearnedLike):
    """A 'weak' model that ignores the label: autoguidance with it is classifier-free guidance."""

    def velocity(self, x, t, cond=None):
        return self.mixture.velocity(x, t)


def _points(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    return x, t, torch.tensor([0, 1, -1] * (n // 3))


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_the_guided_teacher_is_the_exact_guided_velocity_and_map(w):
    x, t, cond = _points()
    teacher = GuidedTeacher(ExactTeacher(MIX), w)
    assert torch.allclose(teacher.velocity(x, t, cond), MIX.velocity(x, t, cond, guidance=w), atol=1e-12)
    s, end = torch.ones(12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    exact = MIX.flow_map(x, s, end, cond, guidance=w)
    assert torch.allclose(teacher.flow_map(x, s, end, cond), exact, atol=1e-6)
    solved = GuidedTeacher(LearnedLike(MIX), w, rtol=1e-9, atol=1e-10).flow_map(x, s, end, cond)  # the generic ODE solve
    assert torch.allclose(solved, exact, atol=1e-7)


def test_per_row_guidance_overrides_the_fixed_scale():
    x, t, cond = _points()
    w = torch.linspace(0, 4, 12, dtype=torch.float64)
    guided = GuidedTeacher(ExactTeacher(MIX), 1.0).velocity(x, t, cond, guidance=w)
    assert torch.allclose(guided, MIX.velocity(x, t, cond, guidance=w), atol=1e-12)


def test_autoguidance_with_a_label_blind_weak_model_is_classifier_free_guidance():
    """``v_weak + w (v - v_weak)`` with ``v_weak(x, t, c) = v(x, t, None)`` is CFG; with a weak model
    that is the teacher itself every scale gives the conditional velocity."""
    x, t, cond = _points()
    auto = GuidedTeacher(ExactTeacher(MIX), 2.5, weak=Unconditional(MIX))
    assert torch.allclose(auto.velocity(x, t, cond), MIX.velocity(x, t, cond, guidance=2.5), atol=1e-12)
    same = GuidedTeacher(ExactTeacher(MIX), 2.5, weak=LearnedLike(MIX))
    assert torch.allclose(same.velocity(x, t, cond), MIX.velocity(x, t, cond), atol=1e-12)


@pytest.mark.parametrize("w", [-0.5, float("nan"), float("inf")])
def test_bad_scales_are_named(w):
    with pytest.raises(ValueError, match="guidance scale must be a finite number >= 0"):
        GuidedTeacher(ExactTeacher(MIX), w)


def test_an_unconditional_teacher_or_weak_model_is_refused():
    unconditional = FlowMapTeacher(FlowMap(MLP(2, width=8, depth=1)))
    with pytest.raises(ValueError, match="class-conditional teacher"):
        GuidedTeacher(unconditional, 2.0)
    with pytest.raises(ValueError, match="class-conditional weak teacher"):
        GuidedTeacher(ExactTeacher(MIX), 2.0, weak=unconditional)
