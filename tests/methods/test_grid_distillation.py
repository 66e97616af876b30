"""Grid distillation (LSD's ``grid_*`` options): zero at the exact map, restoring near it, the
dyadic jumps, the switch-on point and the option checks."""

import pytest
import torch

from flowmaps.methods import Batch, LossContext, build_method
from flowmaps.methods.grid_distillation import composed_jump, dyadic_jumps
from flowmaps.samplers import time_grid
from tests.methods.exact_checks import assert_rejects, assert_restoring, loss_and_grad
from tests.methods.exact_models import exact_model

GRID = dict(preset="paper", diagonal_fraction=0.5, grid_fraction=0.5, grid_substeps=4, grid_levels=3)


def test_dyadic_jumps_are_the_steps_of_uniform_grids():
    s, t = dyadic_jumps(20000, 3, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64)
    gap = s - t
    assert set(torch.unique(gap).tolist()) == {1.0, 0.5, 0.25, 0.125}
    for g in (1.0, 0.5, 0.25, 0.125):  # each level equally often, each segment of a level equally often
        rows = gap == g
        assert abs(rows.double().mean().item() - 0.25) < 0.02
        starts = torch.round(t[rows] / g)
        assert torch.equal(torch.unique(starts), torch.arange(round(1 / g), dtype=torch.float64))
    assert bool(((s <= 1) & (t >= 0)).all())


@pytest.mark.parametrize("rho", [1.0, 2.0, 0.5])
def test_dyadic_jumps_are_the_steps_of_the_sampler_grids(rho):
    """Every jump is a step ``(t_k, t_{k+1})`` of ``time_grid(2^L, rho=rho)``, the grid the sampler uses."""
    s, t = dyadic_jumps(4000, 3, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64, rho)
    steps = {(round(a, 12), round(b, 12)) for n in (1, 2, 4, 8)
             for a, b in zip(time_grid(n, dtype=torch.float64, rho=rho)[:-1].tolist(),
                             time_grid(n, dtype=torch.float64, rho=rho)[1:].tolist())}
    drawn = {(round(a, 12), round(b, 12)) for a, b in zip(s.tolist(), t.tolist())}
    assert drawn == steps


def test_level_weights_set_the_share_of_each_grid():
    s, t = dyadic_jumps(40000, 3, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64,
                        level_weights=[4.0, 0.0, 1.0, 3.0])
    gap = s - t
    assert not bool((gap == 0.5).any())  # level 1 has weight 0
    for g, share in ((1.0, 0.5), (0.25, 0.125), (0.125, 0.375)):
        assert abs((gap == g).double().mean().item() - share) < 0.01


class _Recorder(torch.nn.Module):
    """Records the times it is called with; moves nothing."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[float, float]] = []

    def forward(self, x, s, t, cond=None, check_times=True):
        self.calls.append((float(s[0]), float(t[0])))
        return x


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_composed_jump_takes_the_steps_of_the_finer_grid(rho):
    """The sub-jumps of the grid step ``(t_1, t_2)`` of the 4-step grid are the steps 4..8 of the 16-step grid."""
    grid4, grid16 = time_grid(4, dtype=torch.float64, rho=rho), time_grid(16, dtype=torch.float64, rho=rho)
    model = _Recorder()
    composed_jump(model, torch.zeros(1, 2, dtype=torch.float64), grid4[1:2], grid4[2:3], 4, rho=rho)
    expected = list(zip(grid16[4:8].tolist(), grid16[5:9].tolist()))
    assert len(model.calls) == 4
    for (a, b), (c, d) in zip(model.calls, expected):
        assert a == pytest.approx(c, abs=1e-12) and b == pytest.approx(d, abs=1e-12)


@pytest.mark.parametrize("rho", [1.0, 2.5])
def test_composed_jump_of_the_exact_map_is_the_exact_jump(gaussian, rho):
    model = exact_model(gaussian)
    x = gaussian.sample(256, torch.Generator().manual_seed(1)).double()
    s, t = torch.full((256,), 0.9, dtype=torch.float64), torch.full((256,), 0.1, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(composed_jump(model, x, s, t, 5, rho=rho), model(x, s, t), atol=1e-8)


def test_grid_term_on_a_warped_grid_vanishes_at_the_exact_map_and_rejects_a_flipped_one(gaussian):
    method = build_method("lsd", gaussian.schedule, **GRID, grid_rho=2.0)
    out, _ = loss_and_grad(method, exact_model(gaussian), gaussian, n=2048)
    assert out.terms["grid"] < 1e-12
    assert_rejects(method, gaussian, "grid", "sign_flipped")


def test_grid_term_vanishes_at_the_exact_map(gaussian):
    method = build_method("lsd", gaussian.schedule, **GRID)
    out, grad = loss_and_grad(method, exact_model(gaussian), gaussian, n=2048)
    assert out.terms["grid"] < 1e-12
    assert out.terms["lagrangian"] < 1e-10


def test_grid_term_rejects_a_sign_flipped_map(gaussian):
    assert_rejects(build_method("lsd", gaussian.schedule, **GRID), gaussian, "grid", "sign_flipped")


def test_grid_term_pulls_back_to_the_exact_map(gaussian):
    assert_restoring(build_method("lsd", gaussian.schedule, diagonal_fraction=0.0, grid_fraction=1.0,
                                  grid_substeps=4), gaussian)


def test_grid_target_uses_the_ema_weights_when_given(gaussian):
    """With ``grid_target="ema"`` the target comes from ``ctx.ema_model``: an exact EMA copy makes the
    term the student's distance to the exact map; the online target would make it its own consistency."""
    method = build_method("lsd", gaussian.schedule, **GRID)
    student = exact_model(gaussian)
    with torch.no_grad():
        student.net.delta.fill_(0.3)
    with_ema, _ = loss_and_grad(method, student, gaussian, n=2048, ctx=LossContext(0, 10, exact_model(gaussian)))
    online = build_method("lsd", gaussian.schedule, **GRID, grid_target="online")
    self_target, _ = loss_and_grad(online, student, gaussian, n=2048, ctx=LossContext(0, 10, exact_model(gaussian)))
    assert with_ema.terms["grid"] > 2 * self_target.terms["grid"] > 0


def test_grid_weight_scales_the_term(gaussian):
    student = exact_model(gaussian, "sign_flipped")
    plain, _ = loss_and_grad(build_method("lsd", gaussian.schedule, **GRID), student, gaussian, n=512)
    heavy, _ = loss_and_grad(build_method("lsd", gaussian.schedule, **GRID, grid_weight=30.0), student, gaussian, n=512)
    assert torch.allclose(heavy.terms["grid"], 30 * plain.terms["grid"])
    assert torch.allclose(heavy.terms["lagrangian"], plain.terms["lagrangian"])


def test_grid_term_switches_on_at_grid_start(gaussian):
    method = build_method("lsd", gaussian.schedule, **GRID, grid_start=0.5)
    batch = Batch(gaussian.sample(64, torch.Generator().manual_seed(0)).double())
    model = exact_model(gaussian)
    early = method.loss(model, batch, torch.Generator().manual_seed(0), LossContext(step=4, total_steps=10))
    late = method.loss(model, batch, torch.Generator().manual_seed(0), LossContext(step=5, total_steps=10))
    assert "grid" not in early.terms and "grid" in late.terms


@pytest.mark.parametrize("options, match", [
    (dict(grid_fraction=1.5), "grid_fraction"),
    (dict(grid_substeps=1), "grid_substeps"),
    (dict(grid_substeps=2.5), "grid_substeps"),
    (dict(grid_levels=-1), "grid_levels"),
    (dict(grid_start=1.0), "grid_start"),
    (dict(grid_target="teacher"), "grid_target"),
    (dict(grid_weight=0.0), "grid_weight"),
    (dict(grid_rho=0.0), "grid_rho"),
    (dict(grid_level_weights=[1.0, 1.0]), "grid_level_weights"),
    (dict(grid_levels=1, grid_level_weights=[1.0, -1.0]), "grid_level_weights"),
    (dict(grid_levels=1, grid_level_weights=[0.0, 0.0]), "grid_level_weights"),
    (dict(grid_levels=1, grid_level_weights="uniform"), "grid_level_weights"),
    (dict(grid_rho=float("nan")), "grid_rho"),
])
def test_grid_options_are_checked(gaussian, options, match):
    with pytest.raises(ValueError, match=match):
        build_method("lsd", gaussian.schedule, **options)
