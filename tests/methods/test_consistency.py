"""Consistency methods at the exact Gaussian flow map (the map to data ``F(x, s, 0)``), and their recipes."""

import math

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.methods import Batch, LossContext, build_method, get_method_class
from flowmaps.methods.consistency.anchored import ct_num_steps, ct_target_decay, ict_num_steps
from flowmaps.nets import MLP
from flowmaps.oracle import Gaussian
from flowmaps.teachers import ExactTeacher, FlowMapTeacher
from tests.methods.exact_checks import (
    assert_rejects,
    assert_restoring,
    assert_stationary,
    assert_vanishes,
    loss_and_grad,
)
from tests.methods.exact_models import PerturbedExact, exact_model

LATE = LossContext(step=999, total_steps=1000)  # curricula at their end, warm-ups done


class ExpandedTimeExact(PerturbedExact):
    """FACM's network at the exact map: times ``1 + s`` in ``[1, 2]`` ask for the velocity at ``s``."""

    def forward(self, x, s, t, cond=None):
        expanded = s > 1
        return super().forward(x, torch.where(expanded, s - 1, s), torch.where(expanded, s - 1, t), cond)


def facm_model(target, variant="exact"):
    return FlowMap(ExpandedTimeExact(target, variant))


def test_ct_curriculum_grows_from_s0_to_s1():
    steps = [ct_num_steps(k, 1000) for k in range(0, 1001, 50)]
    assert steps[0] == 1 and steps[-1] == 150
    assert all(a <= b for a, b in zip(steps, steps[1:]))


def test_ict_curriculum_doubles_in_equal_stages():
    # K = 800, K' = floor(800 / (log2(1280 / 10) + 1)) = 100
    assert [ict_num_steps(k, 800) for k in (0, 99, 100, 250, 699, 700, 799)] == [10, 10, 20, 40, 640, 1280, 1280]


def test_intervals_are_grid_cells_drawn_with_the_discretised_time_distribution(gaussian):
    method = build_method("ct", gaussian.schedule, curriculum="fixed", final_steps=4,
                          time_distribution="logit_normal", logit_mean=-0.5, logit_std=1.5)
    g = torch.Generator().manual_seed(0)
    s, r = method.pair_times(Batch(torch.zeros(200_000, 1, dtype=torch.float64)), g, LossContext(), 1.0)
    assert torch.allclose(s - r, torch.full_like(s, 0.25)) and bool((r >= 0).all() and (s <= 1).all())
    edges = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    cdf = torch.special.ndtr((torch.logit(edges) + 0.5) / 1.5)
    expected = cdf[1:] - cdf[:-1]
    observed = torch.stack([(s == e).double().mean() for e in edges[1:]])
    assert torch.allclose(observed, expected, atol=0.005)


@pytest.mark.parametrize("solver,order", [("euler", 2), ("heun", 3)])
def test_cd_residual_is_the_teacher_steps_local_error(solver, order, gaussian):
    """At the exact map the CD residual is the local error O(1/N^order) of the teacher step."""
    losses = []
    for n in (16, 32):
        method = build_method("cd", gaussian.schedule, teacher=ExactTeacher(gaussian), solver=solver, final_steps=n)
        out, grad = loss_and_grad(method, exact_model(gaussian), gaussian)
        losses.append(out.terms["consistency"].item())
        assert abs(grad) < 1e-2
    assert losses[1] < 1e-4
    ratio = losses[0] / losses[1]
    assert 2 ** (2 * order) / 3 < ratio < 3 * 2 ** (2 * order), ratio


@pytest.mark.parametrize("variant", ["time_reversed", "sign_flipped"])
def test_cd_and_ctm_reject_wrong_conventions(variant, gaussian):
    teacher = ExactTeacher(gaussian)
    assert_rejects(build_method("cd", gaussian.schedule, teacher=teacher), gaussian, "consistency", variant)
    ctm = build_method("ctm", gaussian.schedule, teacher=teacher, diagonal_fraction=0.0)
    assert_rejects(ctm, gaussian, "trajectory", variant)


def test_cd_and_ctm_restore_the_exact_map(gaussian):
    teacher = ExactTeacher(gaussian)
    assert_restoring(build_method("cd", gaussian.schedule, teacher=teacher), gaussian)
    assert_restoring(build_method("ctm", gaussian.schedule, teacher=teacher, diagonal_fraction=0.0), gaussian)


def test_ctm_residual_is_near_zero_at_exact_map(gaussian):
    method = build_method("ctm", gaussian.schedule, teacher=ExactTeacher(gaussian), diagonal_fraction=0.0)
    assert_vanishes(method, gaussian, "trajectory", tol=1e-6, grad_tol=1e-3)


def test_ctm_differentiates_the_map_to_data_only_through_its_input():
    """The extra call F_sg(y, t, 0) passes gradients to the jump y but not to its own weights."""
    from flowmaps.methods.consistency.ctm import through_frozen_weights as _through_frozen_weights

    torch.manual_seed(0)
    model = FlowMap(MLP(2, width=16, depth=2)).double()
    x, s = torch.randn(6, 2, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    t, target = 0.5 * s, torch.randn(6, 2, dtype=torch.float64)
    y = model(x, s, t, check_times=False)
    ((_through_frozen_weights(model, y, t, None) - target) ** 2).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    y = model(x, s, t, check_times=False)
    y_in = y.detach().requires_grad_(True)
    (g_y,) = torch.autograd.grad(((model(y_in, t, 0.0, check_times=False) - target) ** 2).sum(), y_in)
    (g_y * y).sum().backward()
    assert torch.allclose(grads, torch.cat([p.grad.flatten() for p in model.parameters()]), atol=1e-12)


@pytest.mark.parametrize("name", ["ct", "ict"])
def test_consistency_training_is_stationary_at_exact_map(name, gaussian):
    """CT's conditional pairs give a loss whose gradient vanishes at the exact map as N grows."""
    method = build_method(name, gaussian.schedule, curriculum="fixed", final_steps=64)
    assert_stationary(method, gaussian, ctx=LATE)
    assert_restoring(method, gaussian, ctx=LATE)


def test_scm_is_stationary_and_restoring_at_exact_map(gaussian):
    method = build_method("scm", gaussian.schedule)
    assert_stationary(method, gaussian, ctx=LATE)
    assert_restoring(method, gaussian, ctx=LATE)


def test_scm_is_the_continuous_time_limit_of_ct(gaussian):
    """Without normalisation (huge c) the sCM gradient times c equals the CT gradient over the step."""
    c, n = 1e6, 4000
    scm = build_method("scm", gaussian.schedule, tangent_norm_c=c, tangent_warmup=0.0)
    ct = build_method("ct", gaussian.schedule, curriculum="fixed", final_steps=n, target_ema_decay=0.0,
                      time_distribution="logit_normal", logit_mean=-1.0, logit_std=1.4)
    model = exact_model(gaussian, "time_reversed")
    _, grad_scm = loss_and_grad(scm, model, gaussian, n=2048)
    _, grad_ct = loss_and_grad(ct, model, gaussian, n=2048)
    assert abs(grad_scm * c - grad_ct * n) < 0.02 * abs(grad_ct * n), (grad_scm * c, grad_ct * n)


def test_scm_tangent_warmup():
    from flowmaps.schedules import LinearSchedule

    method = build_method("scm", LinearSchedule(), tangent_warmup=0.2)
    assert [method.warmup_factor(LossContext(k, 100)) for k in (0, 10, 20, 90)] == [0.0, 0.5, 1.0, 1.0]


def test_facm_vanishes_at_exact_map_and_rejects_wrong_conventions(gaussian):
    method = build_method("facm", gaussian.schedule, teacher=ExactTeacher(gaussian))
    out, grad = loss_and_grad(method, facm_model(gaussian), gaussian)
    assert out.terms["consistency"] < 1e-20 and out.terms["anchor"] < 1e-12 and abs(grad) < 1e-8
    for variant in ("time_reversed", "sign_flipped"):
        bad, _ = loss_and_grad(method, facm_model(gaussian, variant), gaussian)
        assert bad.terms["consistency"] > 1e-2 and bad.terms["anchor"] > 1e-2, variant


def test_facm_restores_the_exact_map(gaussian):
    method = build_method("facm", gaussian.schedule, teacher=ExactTeacher(gaussian))
    for d in (0.2, -0.2):
        model = facm_model(gaussian)
        with torch.no_grad():
            model.net.delta.fill_(d)
        _, grad = loss_and_grad(method, model, gaussian, n=8192)
        assert grad * d > 0


def _ect(gaussian, teacher_model, **options):
    return build_method("ect", gaussian.schedule, teacher=FlowMapTeacher(teacher_model), **options)


def test_ect_initialize_copies_the_teacher_weights_and_the_loss_does_not(gaussian):
    teacher = exact_model(gaussian)
    with torch.no_grad():
        teacher.net.delta.fill_(0.3)
    method, student = _ect(gaussian, teacher), exact_model(gaussian)
    loss_and_grad(method, student, gaussian, n=16)  # a loss call (as after a resume) keeps the weights
    assert student.net.delta.item() == 0.0
    method.initialize(student)
    assert student.net.delta.item() == pytest.approx(0.3)


def test_ect_needs_a_teacher_with_matching_weights(gaussian):
    method = build_method("ect", gaussian.schedule, teacher=ExactTeacher(gaussian))
    with pytest.raises(ValueError, match="no network weights"):
        method.initialize(exact_model(gaussian))
    method = _ect(gaussian, FlowMap(MLP(3, width=8, depth=1)).double())
    with pytest.raises(ValueError, match="does not match"):
        method.initialize(FlowMap(MLP(3, width=16, depth=1)).double())


def test_ect_step_shrinks_by_stage(gaussian):
    method = _ect(gaussian, exact_model(gaussian), stages=4, q=2.0)
    x0 = torch.zeros(1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    s, r = method.pair_times(Batch(x0.expand(1000, 1)), g, LossContext(0, 100), 1.0)
    assert bool((r == 0).all())  # stage 0: Delta = s (diffusion training)
    g = torch.Generator().manual_seed(0)
    s, r = method.pair_times(Batch(x0.expand(1000, 1)), g, LossContext(99, 100), 1.0)
    ratio = (s - r) / s
    assert bool((ratio > 1 / 8 - 1e-12).all() and (ratio <= 9 / 8).all())
    assert float(method.curriculum_state(LossContext(99, 100))["stage"]) == 3


def test_ect_is_stationary_at_exact_map(gaussian):
    method = _ect(gaussian, exact_model(gaussian), stages=10)
    assert_stationary(method, gaussian, ctx=LATE)


def test_pseudo_huber_distance_follows_ict(gaussian):
    method = build_method("ict", gaussian.schedule)
    residual = torch.tensor([[3e-3, 4e-3, 0.0], [3.0, 4.0, 0.0]], dtype=torch.float64)
    c = 0.00054 * math.sqrt(3)
    assert torch.allclose(method.weighting(residual), torch.sqrt(torch.tensor([25e-6, 25.0]) + c * c).double() - c)


def test_ct_target_decay_follows_the_paper():
    """``mu(k) = exp(s_0 log mu_0 / N(k))``: ``mu_0`` at ``N = s_0`` points, 0.9^(2/151) at 150 intervals."""
    assert ct_target_decay(0.9, 2, 1) == pytest.approx(0.9)
    assert ct_target_decay(0.9, 2, 150) == pytest.approx(0.9 ** (2 / 151))
    assert ct_target_decay(0.0, 2, 150) == 0.0


@pytest.mark.parametrize("name,decay", [("ct", 0.9), ("ict", 0.0), ("cd", 0.95), ("ect", 0.0), ("ctm", 0.999)])
def test_paper_target_decays(name, decay, gaussian):
    teacher = {"teacher": FlowMapTeacher(exact_model(gaussian))} if get_method_class(name).needs_teacher else {}
    paper = {"preset": "paper"} if "paper" in get_method_class(name).presets else {}
    method = build_method(name, gaussian.schedule, **teacher, **paper)
    assert method.options.target_ema_decay == decay and (method.target.ema is None) == (decay == 0)


def test_the_ema_target_lags_the_online_weights(gaussian):
    """The target is the method's own EMA: after a jump of the online weights it moves by ``1 - mu``."""
    method = build_method("cd", gaussian.schedule, teacher=ExactTeacher(gaussian), target_ema_decay=0.9)
    model = exact_model(gaussian)
    loss_and_grad(method, model, gaussian, n=16)
    with torch.no_grad():
        model.net.delta.fill_(1.0)
    loss_and_grad(method, model, gaussian, n=16)
    assert method.state_dict()["target"]["net.delta"].item() == pytest.approx(0.1)
    assert model.net.delta.item() == 1.0


def _trained_method(name, gaussian, steps):
    """A method and an MLP after ``steps`` optimiser steps (so the EMA target differs from the weights)."""
    teacher = {"teacher": ExactTeacher(gaussian)} if get_method_class(name).needs_teacher else {}
    paper = {"preset": "paper"} if "paper" in get_method_class(name).presets else {}  # the EMA targets
    method = build_method(name, gaussian.schedule, **teacher, **paper)
    torch.manual_seed(0)
    model = FlowMap(MLP(3, width=16, depth=1)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        optimizer.zero_grad()
        method.loss(model, Batch(gaussian.sample(64, g).double()), g, LossContext(step, 100)).loss.backward()
        optimizer.step()
    return method, model


@pytest.mark.parametrize("name", ["ct", "cd", "ctm"])
def test_state_dict_round_trips(name, gaussian):
    """A method rebuilt from ``state_dict`` gives the identical next loss; a fresh one does not."""
    method, model = _trained_method(name, gaussian, 3)
    state = method.state_dict()
    assert set(state) == {"target"} and set(state["target"]) == {k for k, _ in model.named_parameters()}

    def next_loss(m):
        g = torch.Generator().manual_seed(7)
        return m.loss(model, Batch(gaussian.sample(64, g).double()), g, LossContext(3, 100)).loss.item()

    reloaded, _ = _trained_method(name, gaussian, 0)
    reloaded.load_state_dict(state)
    fresh, _ = _trained_method(name, gaussian, 0)
    expected = next_loss(method)
    assert next_loss(reloaded) == expected
    assert next_loss(fresh) != expected


def test_online_target_methods_keep_no_state(gaussian):
    method = build_method("ict", gaussian.schedule)
    assert method.state_dict() == {}
    with pytest.raises(ValueError, match="keeps no state"):
        method.load_state_dict({"target": {}})


@pytest.mark.parametrize("name", ["ct", "ict", "cd", "ect", "scm", "facm"])
def test_anchored_methods_ask_for_the_consistency_sampler(name):
    assert get_method_class(name).sampler == "consistency"


@pytest.mark.parametrize("name", ["ctm", "psd-u", "shortcut", "fmm"])
def test_two_time_methods_do_not(name):
    assert get_method_class(name).sampler == "flow_map"


@pytest.mark.parametrize("name,kw,msg", [
    ("ct", {"penalty": "l1"}, "penalty"), ("ct", {"weighting": "sigma"}, "weighting"),
    ("ct", {"target_ema_decay": 1.0}, "target_ema_decay"), ("ct", {"curriculum": "linear"}, "curriculum"),
    ("ct", {"initial_steps": 5, "final_steps": 2}, "initial_steps"), ("ct", {"penalty_c": 0.0}, "penalty_c"),
    ("scm", {"tangent_norm_c": 0.0}, "tangent_norm_c"), ("scm", {"jvp_backend": "magic"}, "jvp_backend"),
])
def test_bad_options(name, kw, msg, gaussian):
    with pytest.raises(ValueError, match=msg):
        build_method(name, gaussian.schedule, **kw)


@pytest.mark.parametrize("name,kw,msg", [("cd", {"solver": "rk4"}, "solver"), ("ctm", {"num_steps": 0}, "num_steps"),
                                         ("ect", {"q": 1.0}, r"q of method .ect. must lie in \(1, inf\)"),
                                         ("ctm", {"target_ema_decay": -0.1}, "target_ema_decay"),
                                         ("facm", {"adaptive_c": -1.0}, "adaptive_c")])
def test_bad_teacher_method_options(name, kw, msg, gaussian):
    with pytest.raises(ValueError, match=msg):
        build_method(name, gaussian.schedule, teacher=ExactTeacher(gaussian), **kw)


@pytest.mark.parametrize("name", ["cd", "ctm", "facm", "ect"])
def test_teacher_methods_refuse_to_start_without_one(name, gaussian):
    with pytest.raises(ValueError, match="--teacher"):
        build_method(name, gaussian.schedule)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("consistency-runs")


@pytest.mark.slow
@pytest.mark.parametrize("name,steps,kw", [
    # Each method keeps its own EMA target at its paper's rate (CT mu_0 = 0.9, CD 0.95); a target
    # moves information about one grid interval per EMA time constant, so a short CT run needs a
    # coarse grid (N <= 15: mu(k) <= 0.987) and CTM (paper 0.999, time constant 1000 steps) a faster
    # rate; 1/(s - r) weights keep CT's loss from shrinking with the step as the curriculum refines it.
    ("ct", 2000, {"options": {"final_steps": 15, "weighting": "inverse_step"}}),
    ("ict", 500, {}),
    ("cd", 800, {"teacher": "exact"}),
    ("ctm", 500, {"teacher": "exact", "options": {"num_steps": 8, "target_ema_decay": 0.9}}),
    ("facm", 500, {"teacher": "exact"}),
    ("scm", 500, {}),
])
def test_short_run_beats_an_untrained_model(runs_dir, name, steps, kw):
    from tests.methods.short_runs import assert_trains

    assert_trains(runs_dir, name, steps, **kw)


@pytest.mark.slow
def test_ect_short_run_tunes_an_fm_teacher(runs_dir):
    from tests.methods.short_runs import assert_trains, run

    teacher = run(runs_dir / "teacher", "fm", 500)
    assert_trains(runs_dir, "ect", 500, teacher=str(teacher))


def test_ctm_frozen_map_under_ddp_reduces_every_gradient_once(tmp_path):
    """The stop-gradient-weights call bypasses the DDP wrapper (it makes no weight gradient), while
    the student's call goes through it: a CTM loss under one-process DDP (gloo) gives the unwrapped
    model's gradients, and every parameter passes the all-reduce hook."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.ddp_hooks import count_reduced_gradients

    from flowmaps.methods.consistency.ctm import through_frozen_weights as _through_frozen_weights

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = FlowMap(MLP(2, width=16, depth=2)).double()
        torch.manual_seed(0)
        ddp = DDP(FlowMap(MLP(2, width=16, depth=2)).double())
        reduced = count_reduced_gradients(ddp)
        x, s = torch.randn(6, 2, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
        t, target = 0.5 * s, torch.randn(6, 2, dtype=torch.float64)
        grads = []
        for _ in range(3):  # DDP rebuilds its buckets after the first iteration
            grads.clear()
            for m in (plain, ddp):
                m.zero_grad()
                reduced.clear()
                jump = m(x, s, t, check_times=False)
                ((_through_frozen_weights(m, jump, t, None) - target) ** 2).sum().backward()
                grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
            assert torch.allclose(grads[0], grads[1], atol=1e-12)
            assert sum(reduced) == len(list(plain.parameters()))
    finally:
        dist.destroy_process_group()


def test_scm_and_ayf_normalise_the_tangent_by_its_l2_norm_on_high_dimensional_input():
    """sCM's Algorithm 1 (and AYF): ``g / (||g||_2 + c)``, the L2 norm over all 784 features of an
    example, not the RMS: the normalised tangent has L2 norm below 1, so the pseudo-loss (its mean square
    over features) is below 1 / D; the ``rms`` option keeps it near 1."""
    from flowmaps.methods.skeleton import normalise_tangent
    from flowmaps.schedules import LinearSchedule

    d = 784
    g = 3.0 * torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    l2, rms = normalise_tangent(g, 0.1), normalise_tangent(g, 0.1, "rms")
    norms = g.flatten(1).norm(dim=1)
    assert torch.allclose(l2.flatten(1).norm(dim=1), norms / (norms + 0.1))
    assert torch.allclose(rms.flatten(1).pow(2).mean(dim=1).sqrt(), (norms / d**0.5) / (norms / d**0.5 + 0.1))
    torch.manual_seed(0)
    model = FlowMap(MLP(d, width=32, depth=1))
    batch = Batch(torch.randn(64, d, generator=torch.Generator().manual_seed(1)))
    losses = {}
    for norm in ("l2", "rms"):
        method = build_method("scm", LinearSchedule(), tangent_norm=norm, tangent_warmup=0.0)
        losses[norm] = float(method.loss(model, batch, torch.Generator().manual_seed(2)).terms["consistency"])
    assert losses["l2"] < 1 / d and 0.5 < losses["rms"] <= 1.0, losses
    teacher = ExactTeacher(Gaussian(torch.zeros(d), torch.ones(d)))
    ayf = build_method("ayf-emd", LinearSchedule(), teacher=teacher)
    assert float(ayf.loss(model, batch, torch.Generator().manual_seed(3)).terms["eulerian"]) < 1 / d
