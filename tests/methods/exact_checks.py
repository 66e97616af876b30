"""Checks of a method at the exact Gaussian flow map (shared by the Lagrangian and Eulerian tests)."""

from typing import Optional, Union

import torch

from flowmaps.methods import Batch, LossContext, Method
from tests.methods.exact_models import exact_model


def loss_and_grad(method: Method, model, target, n: int = 4096, seed: int = 0,
                  ctx: Optional[LossContext] = None, device: Union[str, torch.device] = "cpu"):
    """The method's ``LossOutput`` on ``n`` exact samples and ``dL/d delta`` of the perturbed model,
    everything (model, batch, random numbers) on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    model = model.to(device)
    batch = Batch(target.sample(n, g, device).double())
    out = method.loss(model, batch, g, ctx)
    model.zero_grad()
    out.loss.backward()
    grad = model.net.delta.grad
    return out, 0.0 if grad is None else grad.item()


def assert_vanishes(method: Method, target, term: str, tol: float = 1e-10, grad_tol: float = 1e-6, **kw):
    """The rule's term is (near-)zero at the exact map and so is its gradient."""
    out, grad = loss_and_grad(method, exact_model(target), target, **kw)
    assert out.terms[term] < tol, (term, float(out.terms[term]))
    assert abs(grad) < grad_tol, grad


def assert_rejects(method: Method, target, term: str, variant: str, floor: float = 1e-2, **kw):
    """The rule's term is large for a map in the wrong convention (``variant`` of ``exact_model``)."""
    out, _ = loss_and_grad(method, exact_model(target, variant), target, **kw)
    assert out.terms[term] > floor, (term, variant, float(out.terms[term]))


def assert_stationary(method: Method, target, n: int = 20000, ctx: Optional[LossContext] = None):
    """A loss with conditional (noisy) targets is stationary at the exact map up to Monte-Carlo noise:
    ``|dL/d delta|`` there is small and much smaller than at the time-reversed map."""
    _, grad_exact = loss_and_grad(method, exact_model(target), target, n=n, ctx=ctx)
    _, grad_wrong = loss_and_grad(method, exact_model(target, "time_reversed"), target, n=n, ctx=ctx)
    assert abs(grad_wrong) > 10 * abs(grad_exact), (grad_exact, grad_wrong)
    return grad_exact, grad_wrong


def assert_restoring(method: Method, target, delta: float = 0.2, n: int = 8192,
                     ctx: Optional[LossContext] = None):
    """Away from the exact map (``delta != 0``) the (semi-)gradient points back to it: a descent step
    on ``delta`` decreases ``|delta|``. A sign error in a target or a stop-gradient step fails this."""
    for d in (delta, -delta):
        model = exact_model(target)
        with torch.no_grad():
            model.net.delta.fill_(d)
        _, grad = loss_and_grad(method, model, target, n=n, ctx=ctx)
        assert grad * d > 0, (d, grad)


def assert_fixed_point(method: Method, target, batches: int = 8, n: int = 10000,
                       ctx: Optional[LossContext] = None) -> None:
    """The exact map is a fixed point of the (semi-)gradient within Monte-Carlo error, and the map of the
    opposite convention is not: over ``batches`` independent batches the mean ``dL/d delta`` at the exact
    map is within three standard errors of zero (plus 0.1 % of the gradient at the wrong map, for the
    round-off and the residual error of a finite step in a method's ``exact_limit``), and at the
    time-reversed map it is five standard errors away from zero and beyond the exact map's band. Sound
    for losses with noisy (conditional) targets and for normalised ones, whose gradients are small
    everywhere."""
    def grads(variant: str) -> torch.Tensor:
        return torch.tensor([loss_and_grad(method, exact_model(target, variant), target, n=n, seed=k, ctx=ctx)[1]
                             for k in range(batches)], dtype=torch.float64)

    exact, wrong = grads("exact"), grads("time_reversed")
    band = 3 * exact.std() / batches**0.5 + 1e-3 * abs(wrong.mean())
    assert abs(exact.mean()) < band, (exact.mean(), band)
    assert abs(wrong.mean()) > max(5 * wrong.std() / batches**0.5, abs(exact.mean()) + band), (exact, wrong)


def assert_exact_samples(x: torch.Tensor, target, pairs: int = 5) -> None:
    """``x`` is distributed as ``target``: its energy distance to exact samples is within twice the
    largest distance between ``pairs`` pairs of independent exact samples of the same size (a floor
    robust to the binomial noise of a mixture's component counts)."""
    from flowmaps.metrics import energy_distance

    n = x.shape[0]
    reference = target.sample(n, torch.Generator().manual_seed(10_000)).double()
    floors = [energy_distance(target.sample(n, torch.Generator().manual_seed(10_001 + k)).double(), reference)
              for k in range(pairs)]
    assert energy_distance(x.double(), reference) < 2 * max(floors), (energy_distance(x.double(), reference), floors)
