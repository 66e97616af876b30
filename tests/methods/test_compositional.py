"""Compositional methods at the exact Gaussian flow map: residuals vanish, wrong conventions fail."""

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.methods import Batch, LossContext, build_method, get_method_class
from flowmaps.nets import MLP
from flowmaps.teachers import ExactTeacher
from tests.methods.exact_checks import (
    assert_rejects,
    assert_restoring,
    assert_stationary,
    assert_vanishes,
    loss_and_grad,
)
from tests.methods.exact_models import exact_model

SELF = ["psd-u", "psd-m", "shortcut"]
TEACHER = ["splitmeanflow", "pfmm"]


def _build(name, gaussian, **options):
    teacher = ExactTeacher(gaussian) if get_method_class(name).needs_teacher else None
    return build_method(name, gaussian.schedule, teacher=teacher, **options)


RULE_TERMS = {"pfmm": "pfmm"}  # the others log their rule as "compositional"


def _rule_only(name, gaussian):
    """The method with its whole batch on the compositional rule (no diagonal term)."""
    options = {} if name in ("pfmm",) else {"diagonal_fraction": 0.0}
    return _build(name, gaussian, **options)


@pytest.mark.parametrize("name", ["psd-u", "psd-m", "splitmeanflow", "pfmm"])
def test_rule_vanishes_at_exact_map(name, gaussian):
    method = _rule_only(name, gaussian)
    assert_vanishes(method, gaussian, RULE_TERMS.get(name, "compositional"), tol=1e-14, grad_tol=1e-9)


def test_shortcut_rule_is_near_zero_at_exact_map(gaussian):
    """Exact at every level but the finest, whose half steps use the velocity (an O(h^2) Heun step)."""
    coarse = _rule_only("shortcut", gaussian)
    out, grad = loss_and_grad(coarse, exact_model(gaussian), gaussian)
    assert out.terms["compositional"] < 1e-5 and abs(grad) < 1e-2
    fine = _build("shortcut", gaussian, diagonal_fraction=0.0, max_steps=1024)
    out_fine, _ = loss_and_grad(fine, exact_model(gaussian), gaussian)
    assert out_fine.terms["compositional"] < out.terms["compositional"] / 30


@pytest.mark.parametrize("name", SELF + TEACHER)
def test_rule_rejects_sign_flipped_map(name, gaussian):
    method = _rule_only(name, gaussian)
    assert_rejects(method, gaussian, RULE_TERMS.get(name, "compositional"), "sign_flipped", floor=1e-3)


@pytest.mark.parametrize("name", SELF + TEACHER)
def test_semigradient_restores_the_exact_map(name, gaussian):
    assert_restoring(_rule_only(name, gaussian), gaussian)


@pytest.mark.parametrize("name", SELF)
def test_conditional_diagonal_is_stationary_and_rejects_time_reversal(name, gaussian):
    """The time-reversed map composes exactly (it is a flow map of the reversed ODE): only the
    diagonal ties it to the data, and it must reject it."""
    out, _ = loss_and_grad(_rule_only(name, gaussian), exact_model(gaussian, "time_reversed"), gaussian)
    assert out.terms["compositional"] < 1e-4
    assert_stationary(_build(name, gaussian, diagonal_fraction=1.0), gaussian)


def test_splitmeanflow_teacher_diagonal_rejects_time_reversal(gaussian):
    method = _build("splitmeanflow", gaussian, diagonal_fraction=1.0)
    assert_vanishes(method, gaussian, "diagonal", tol=1e-20, grad_tol=1e-12)
    assert_rejects(method, gaussian, "diagonal", "time_reversed", floor=1.0)


def test_pfmm_rejects_time_reversal_and_needs_a_flow_map_teacher(gaussian):
    assert_rejects(_rule_only("pfmm", gaussian), gaussian, "pfmm", "time_reversed", floor=0.1)

    class VelocityOnly:
        def velocity(self, x, t, cond=None):
            return gaussian.velocity(x, t)

    method = build_method("pfmm", gaussian.schedule, teacher=VelocityOnly())
    with pytest.raises(ValueError, match="flow-map teacher"):
        loss_and_grad(method, exact_model(gaussian), gaussian, n=8)


@pytest.mark.parametrize("steps", [1, 3])
def test_pfmm_matches_any_number_of_teacher_steps(steps, gaussian):
    assert_vanishes(_build("pfmm", gaussian, teacher_steps=steps), gaussian, "pfmm", tol=1e-20)


def test_fmm_inverse_vanishes_and_matching_is_stationary(gaussian):
    method = _build("fmm", gaussian)
    out, _ = loss_and_grad(method, exact_model(gaussian), gaussian)
    assert out.diagnostics["inverse"] < 1e-20
    assert_stationary(method, gaussian)
    bad, _ = loss_and_grad(method, exact_model(gaussian, "sign_flipped"), gaussian)
    assert bad.diagnostics["inverse"] > 1e-2


def test_fmm_trains_both_directions_and_jvp_backends_agree(gaussian):
    """Loss and parameter gradients of an MLP flow map agree across JVP backends."""
    results = []
    for backend in ("func", "forward_ad", "double_backward"):
        torch.manual_seed(0)
        model = FlowMap(MLP(3, width=16, depth=2)).double()
        g = torch.Generator().manual_seed(1)
        out = build_method("fmm", gaussian.schedule, jvp_backend=backend).loss(
            model, Batch(gaussian.sample(64, g).double()), g)
        out.loss.backward()
        results.append((out.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    for loss, grads in results[1:]:
        assert abs(loss - results[0][0]) < 1e-10 and torch.allclose(grads, results[0][1], atol=1e-8)
    g = torch.Generator().manual_seed(0)
    pairs = build_method("fmm", gaussian.schedule).pairs.sample(1000, g, torch.device("cpu"))
    assert 0.4 < (pairs.s > pairs.t).float().mean().item() < 0.6


def test_shortcut_times_lie_on_the_dyadic_grid():
    from flowmaps.schedules import LinearSchedule

    method = build_method("shortcut", LinearSchedule(), max_steps=8)
    g = torch.Generator().manual_seed(0)
    s, t = method.pair_times(Batch(torch.zeros(4000, 1)), g, LossContext(), 1.0)
    d = s - t
    levels = torch.round(-torch.log2(d))
    assert torch.allclose(d, 2.0**-levels) and set(levels.tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert bool((s <= 1).all() and (t >= 0).all())
    assert torch.allclose(torch.round(s / d) * d, s)  # s is a multiple of its step


def test_shortcut_uses_the_ema_target_when_there_is_one(gaussian):
    """The bootstrap target comes from ctx.ema_model: an exact EMA makes the rule vanish for any student."""
    method = _rule_only("shortcut", gaussian)
    student = exact_model(gaussian)
    with torch.no_grad():
        student.net.delta.fill_(0.3)
    ctx = LossContext(0, 1, ema_model=exact_model(gaussian))
    out_ema, _ = loss_and_grad(method, student, gaussian, ctx=ctx)
    out_online, _ = loss_and_grad(method, student, gaussian)
    assert out_ema.terms["compositional"] > 10 * out_online.terms["compositional"]


@pytest.mark.parametrize("name,kw,msg", [("shortcut", {"max_steps": 12}, "power of two"),
                                         ("pfmm", {"teacher_steps": 0}, "teacher_steps"),
                                         ("fmm", {"jvp_backend": "magic"}, "jvp_backend")])
def test_bad_options(name, kw, msg, gaussian):
    with pytest.raises(ValueError, match=msg):
        _build(name, gaussian, **kw)


@pytest.mark.parametrize("name", TEACHER)
def test_teacher_methods_refuse_to_start_without_one(name, gaussian):
    with pytest.raises(ValueError, match="--teacher"):
        build_method(name, gaussian.schedule)


def test_batch_is_split_between_diagonal_and_rule(gaussian):
    method = _build("psd-m", gaussian, diagonal_fraction=0.25)
    g = torch.Generator().manual_seed(0)
    out = method.loss(exact_model(gaussian, "sign_flipped"), Batch(gaussian.sample(64, g).double()), g)
    assert set(out.terms) == {"diagonal", "compositional"}
    expected = (16 * out.terms["diagonal"] + 48 * out.terms["compositional"]) / 64
    assert torch.allclose(out.loss.detach(), expected)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compositional-runs")


@pytest.mark.slow
@pytest.mark.parametrize("name,steps,kw", [
    ("psd-u", 500, {}),
    ("psd-m", 500, {}),
    ("shortcut", 500, {}),
    ("splitmeanflow", 500, {"teacher": "exact"}),
    ("fmm", 800, {"options": {"diagonal_fraction": 0.25}}),
])
def test_short_run_beats_an_untrained_model(runs_dir, name, steps, kw):
    from tests.methods.short_runs import assert_trains

    assert_trains(runs_dir, name, steps, **kw)


@pytest.mark.slow
def test_pfmm_short_run_from_a_psd_flow_map_teacher(runs_dir):
    from tests.methods.short_runs import assert_trains, run

    teacher = run(runs_dir / "teacher", "psd-m", 500)
    assert_trains(runs_dir, "pfmm", 500, teacher=str(teacher))
