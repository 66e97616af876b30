"""Every loss must vanish (or be stationary) at the exact flow map, and reject the wrong convention."""

import torch

from flowmaps.methods import Batch, build_method
from tests.methods.exact_models import exact_model


def _loss_and_grad(method, model, gaussian, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = Batch(gaussian.sample(n, g).double())
    out = method.loss(model, batch, g)
    model.zero_grad()
    out.loss.backward()
    return out, model.net.delta.grad.item()


def test_lsd_lagrangian_residual_vanishes_at_exact_map(gaussian):
    method = build_method("lsd", gaussian.schedule, diagonal_fraction=0.0)
    out, grad = _loss_and_grad(method, exact_model(gaussian), gaussian)
    assert out.terms["lagrangian"] < 1e-10
    assert abs(grad) < 1e-6


def test_lsd_rejects_a_sign_flipped_map(gaussian):
    method = build_method("lsd", gaussian.schedule, diagonal_fraction=0.0)
    out, _ = _loss_and_grad(method, exact_model(gaussian, "sign_flipped"), gaussian)
    assert out.terms["lagrangian"] > 1e-2


def test_lsd_jvp_backends_agree(gaussian):
    losses = []
    for backend in ("func", "forward_ad", "double_backward"):
        method = build_method("lsd", gaussian.schedule, diagonal_fraction=0.0, jvp_backend=backend)
        out, _ = _loss_and_grad(method, exact_model(gaussian, "sign_flipped"), gaussian, n=256)
        losses.append(out.loss.item())
    assert max(losses) - min(losses) < 1e-10


def _diagonal_gradient_stationary(name, gaussian, **options):
    """The conditional diagonal loss is stationary at the exact velocity: dL/d delta ~ 0 (Monte-Carlo noise).

    Compared against the gradient at the time-reversed map, which must be far from zero.
    """
    method = build_method(name, gaussian.schedule, **options)
    _, grad_exact = _loss_and_grad(method, exact_model(gaussian), gaussian, n=20000)
    _, grad_wrong = _loss_and_grad(method, exact_model(gaussian, "time_reversed"), gaussian, n=20000)
    assert abs(grad_exact) < 0.03
    assert abs(grad_wrong) > 10 * abs(grad_exact)


def test_fm_loss_is_stationary_at_exact_velocity(gaussian):
    _diagonal_gradient_stationary("fm", gaussian)


def test_lsd_diagonal_part_is_stationary_at_exact_velocity(gaussian):
    _diagonal_gradient_stationary("lsd", gaussian, diagonal_fraction=1.0)


def test_fm_marginal_residual_vanishes(gaussian):
    """V(x, t, t) of the exact map equals E[alpha' x_0 + sigma' eps | x_t = x] (the oracle velocity)."""
    model = exact_model(gaussian)
    x = torch.randn(32, 3, dtype=torch.float64)
    t = torch.rand(32, dtype=torch.float64)
    assert torch.allclose(model.velocity(x, t), gaussian.velocity(x, t), atol=1e-12)
