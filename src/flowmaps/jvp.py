"""Primal and directional derivative of a function in one call, with selectable backends.

``jvp(fn, primals, tangents)`` returns ``(fn(*primals), d/de fn(*(p + e * d)) at e = 0)``. Flow-map
losses need it along tangents of ``(x, s, t)``: the Lagrangian rule uses ``(0, 0, 1)`` (``d/dt F``),
the Eulerian rule uses ``(v, 1, 0)`` (``d/ds F + grad_x F . v``). Both outputs stay differentiable
with respect to the parameters ``fn`` closes over, so a loss may back-propagate through the tangent.

Backends:

- ``"func"``: ``torch.func.jvp`` (forward mode; primal and tangent in one pass).
- ``"forward_ad"``: ``torch.autograd.forward_ad`` dual tensors (forward mode).
- ``"double_backward"``: the double-vjp trick, for kernels with backward but no forward-mode rule.
- ``"finite_difference"``: central difference ``(f(p + h d) - f(p - h d)) / 2h``; the fallback for
  anything else. Its error is ``O(h^2)``; run it in float64 where accuracy matters.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

JVP_BACKENDS = ("func", "forward_ad", "double_backward", "finite_difference")


def jvp(
    fn: Callable[..., torch.Tensor],
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    backend: str = "func",
    fd_step: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(fn(*primals), J_fn(primals) . tangents)`` computed with ``backend``."""
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp needs one tangent per primal; got {len(primals)} primals, {len(tangents)} tangents")
    for i, (p, d) in enumerate(zip(primals, tangents)):
        if p.shape != d.shape:
            raise ValueError(f"tangent {i} has shape {tuple(d.shape)}, primal has shape {tuple(p.shape)}")
    if backend == "func":
        return torch.func.jvp(fn, primals, tangents)
    if backend == "forward_ad":
        return _forward_ad(fn, primals, tangents)
    if backend == "double_backward":
        return _double_backward(fn, primals, tangents)
    if backend == "finite_difference":
        return _finite_difference(fn, primals, tangents, fd_step)
    raise ValueError(f"unknown JVP backend {backend!r}; choose one of {JVP_BACKENDS}")


def _forward_ad(fn, primals, tangents):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, d) for p, d in zip(primals, tangents)]
        out = fwAD.unpack_dual(fn(*duals))
        tangent = out.tangent if out.tangent is not None else torch.zeros_like(out.primal)
        return out.primal, tangent


def _double_backward(fn, primals, tangents):
    # J d = d/du [ (J^T u) . d ]: one vjp with a dummy cotangent u, then differentiate it in u.
    inputs = [p.detach().requires_grad_(True) if not p.requires_grad else p for p in primals]
    with torch.enable_grad():
        out = fn(*inputs)
        u = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, inputs, grad_outputs=u, create_graph=True, allow_unused=True)
        dot = sum((g * d).sum() for g, d in zip(grads, tangents) if g is not None)
        if not isinstance(dot, torch.Tensor):
            return out, torch.zeros_like(out)
        (tangent,) = torch.autograd.grad(dot, u, create_graph=True)
    return out, tangent


def _finite_difference(fn, primals, tangents, step):
    if step is None:
        step = 1e-6 if primals[0].dtype == torch.float64 else 1e-3
    plus = fn(*[p + step * d for p, d in zip(primals, tangents)])
    minus = fn(*[p - step * d for p, d in zip(primals, tangents)])
    return fn(*primals), (plus - minus) / (2 * step)
