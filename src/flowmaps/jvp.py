"""Primal and directional derivative of a function in one call, with selectable backends.

``jvp(fn, primals, tangents)`` returns ``(fn(*primals), d/de fn(*(p + e * d)) at e = 0)``. Flow-map
losses need it along tangents of ``(x, s, t)``: the Lagrangian rule uses ``(0, 0, 1)`` (``d/dt F``),
the Eulerian rule uses ``(v, 1, 0)`` (``d/ds F + grad_x F . v``). ``flow_jvp`` is the entry point the
methods use: it calls the model only as ``model(x, s, t, cond, output=..., check_times=False)`` and
decides where gradients flow.

Backends:

- ``"func"``: ``torch.func.jvp`` (forward mode; primal and tangent in one pass).
- ``"forward_ad"``: ``torch.autograd.forward_ad`` dual tensors (forward mode).
- ``"double_backward"``: the double-vjp trick, for kernels with backward but no forward-mode rule.
- ``"finite_difference"``: central difference ``(f(p + h d) - f(p - h d)) / 2h``; the fallback for
  anything else. Its error is ``O(h^2)``; ``flow_jvp`` runs it in float64 unless told otherwise.
- ``"fused"`` (``flow_jvp`` only): the backbone's own closed-form tangent
  (``FlowMap(..., tangents=(dx, ds, dt))``, e.g. ``MLP.forward_with_tangent``), primal and tangent
  in one ordinary forward whose gradient is plain reverse mode (so nothing special under DDP). With
  ``grad="primal"`` it is a single pass too: the backbone computes the tangent without gradient
  from the detached activations of the gradient-carrying forward (no second forward, no RNG replay).
  Measured costs against ``"func"`` are in ``docs/benchmarks.md`` ("Method iteration cost").
- ``"auto"`` (``flow_jvp`` only, the methods' default): ``"fused"`` when the backbone has it, else
  ``"func"``.

Gradient modes of ``flow_jvp`` (``grad=``):

- ``"full"``: primal and tangent both carry gradients (losses that back-propagate through the
  derivative: LMD, EMD, LSD, TVM). One pass of the backend through the model's own forward. Under
  ``DistributedDataParallel`` the ``"func"`` backend is replaced by ``"forward_ad"`` (the same
  derivative): DDP rebuilds its gradient buckets during the second gradient-enabled forward, which
  fails inside ``torch.func.jvp`` ("Cannot access data pointer of Tensor that doesn't have
  storage"), whereas dual tensors are ordinary tensors to it.
- ``"primal"``: the tangent is computed without gradient (it sits under stop-gradient) and the
  gradient-carrying primal comes from a *separate ordinary forward*. Under
  ``DistributedDataParallel`` that forward is what registers the gradient hooks, so gradient
  synchronisation never depends on how a backend interacts with DDP. The random-number state is
  replayed before that forward (CPU and the input's accelerator), so dropout masks are identical in
  both passes. The tangent may be computed in a higher precision (``tangent_dtype``). (Taking the
  primal from a gradient-enabled tangent pass instead saves no time on CPU and doubles the peak
  memory: the tangent's operations record a graph of their own, measured with
  ``benchmarks/method_cost.py``.)
- ``"none"``: everything without gradient (targets).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

FN_BACKENDS = ("func", "forward_ad", "double_backward", "finite_difference")  # any function
JVP_BACKENDS = FN_BACKENDS + ("fused", "auto")  # flow_jvp: also the backbone's own tangent
GRAD_MODES = ("full", "primal", "none")

TangentLike = Union[float, torch.Tensor]


class RandomReplay:
    """Capture the random-number state now (CPU and, for a CUDA ``device``, that GPU); ``restore()``
    rewinds to it, so a second pass draws the same dropout masks as the first."""

    def __init__(self, device: torch.device):
        self.cpu_state = torch.get_rng_state()
        self.cuda_device = device if device.type == "cuda" else None
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda_device is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda_device)


def check_backend(backend: str, owner: str = "jvp_backend") -> None:
    """Raise a ``ValueError`` naming ``owner`` unless ``backend`` is one of ``JVP_BACKENDS``."""
    if backend not in JVP_BACKENDS:
        raise ValueError(f"unknown {owner}: {backend!r}; choose one of {JVP_BACKENDS}")


def jvp(
    fn: Callable[..., torch.Tensor],
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    backend: str = "func",
    fd_step: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(fn(*primals), J_fn(primals) . tangents)`` computed with ``backend``.

    Both outputs stay differentiable with respect to whatever ``fn`` closes over (its parameters),
    unless the caller runs this under ``torch.no_grad``.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp needs one tangent per primal; got {len(primals)} primals, {len(tangents)} tangents")
    for i, (p, d) in enumerate(zip(primals, tangents)):
        if p.shape != d.shape:
            raise ValueError(f"tangent {i} has shape {tuple(d.shape)}, primal has shape {tuple(p.shape)}")
    if backend not in FN_BACKENDS:
        raise ValueError(f"unknown JVP backend for a plain function: {backend!r}; choose one of {FN_BACKENDS} "
                         "('fused' and 'auto' need a FlowMap: use flow_jvp)")
    if backend == "func":
        return torch.func.jvp(fn, primals, tangents)
    if backend == "forward_ad":
        return _forward_ad(fn, primals, tangents)
    if backend == "double_backward":
        return _double_backward(fn, primals, tangents)
    return _finite_difference(fn, primals, tangents, fd_step)


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
        (tangent,) = torch.autograd.grad(dot, u, create_graph=True, allow_unused=True)
    if tangent is None:  # the output does not depend on the inputs along the tangent
        tangent = torch.zeros_like(out)
    return out, tangent


def _finite_difference(fn, primals, tangents, step):
    if step is None:
        step = 1e-6 if primals[0].dtype == torch.float64 else 1e-3
    if not step > 0:
        raise ValueError(f"the finite-difference step must be positive; got {step}")
    replay = RandomReplay(primals[0].device)  # the three evaluations see the same dropout masks
    plus = fn(*[p + step * d for p, d in zip(primals, tangents)])
    replay.restore()
    minus = fn(*[p - step * d for p, d in zip(primals, tangents)])
    replay.restore()
    return fn(*primals), (plus - minus) / (2 * step)


def _as_time_tangent(d: Optional[TangentLike], like: torch.Tensor, name: str) -> torch.Tensor:
    if d is None:
        return torch.zeros_like(like)
    if not isinstance(d, torch.Tensor):
        return torch.full_like(like, float(d))
    d = d.to(device=like.device, dtype=like.dtype)
    if d.dim() == 0:
        return d.expand_as(like).clone()
    if d.shape != like.shape:
        raise ValueError(f"tangent {name} must be a float or a tensor of shape {tuple(like.shape)}; got {tuple(d.shape)}")
    return d


def _in_dtype(model: nn.Module, cond: Optional[torch.Tensor], output: str, dtype: torch.dtype, fused: bool):
    """``(x, s, t) -> model(x, s, t, cond)`` (``fused``: ``(x, s, t, dx, ds, dt) -> (G, dG)``) evaluated
    with every floating parameter and buffer cast to ``dtype`` (the module itself is left untouched)."""
    state = {
        name: (value.to(dtype) if value.is_floating_point() else value)
        for name, value in list(model.named_parameters()) + list(model.named_buffers())
    }
    cond_cast = cond.to(dtype) if cond is not None and cond.is_floating_point() else cond

    def fn(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *tangents: torch.Tensor) -> torch.Tensor:
        kwargs = {"output": output, "check_times": False}
        if fused:
            kwargs["tangents"] = tangents
        return torch.func.functional_call(model, state, (x, s, t, cond_cast), kwargs)

    return fn


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def resolve_backend(model: nn.Module, backend: str) -> str:
    """``backend``, with ``"auto"`` resolved: ``"fused"`` when the (unwrapped) model computes its own
    tangents (``FlowMap.has_fused_tangent``), else ``"func"``."""
    check_backend(backend)
    if backend != "auto":
        return backend
    return "fused" if getattr(_unwrap(model), "has_fused_tangent", False) else "func"


def flow_jvp(
    model: nn.Module,
    x: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    cond: Optional[torch.Tensor] = None,
    *,
    dx: Optional[torch.Tensor] = None,
    ds: Optional[TangentLike] = None,
    dt: Optional[TangentLike] = None,
    output: str = "F",
    backend: str = "auto",
    grad: str = "full",
    tangent_dtype: Optional[torch.dtype] = None,
    fd_step: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G(x, s, t), d/de G(x + e dx, s + e ds, t + e dt) at e = 0)`` for ``G = F`` or ``V`` (``output``).

    ``s`` and ``t`` are ``[B]`` tensors; ``dx`` is shaped like ``x`` (default 0); ``ds`` and ``dt``
    are floats or ``[B]`` tensors (default 0). ``grad`` is ``"full"``, ``"primal"`` or ``"none"``
    (module docstring). ``tangent_dtype`` (e.g. ``torch.float64``) computes a stop-gradient tangent in
    higher precision; the ``"finite_difference"`` backend uses float64 for it by default.

    Example, the Eulerian residual ``d/ds F + grad_x F . v`` at ``(x_s, s, t)``::

        F, residual = flow_jvp(model, x_s, s, t, dx=v, ds=1.0, output="F")
    """
    backend = resolve_backend(model, backend)
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown gradient mode {grad!r}; choose one of {GRAD_MODES}")
    if output not in ("F", "V"):
        raise ValueError(f"output must be 'F' or 'V'; got {output!r}")
    if s.shape != (x.shape[0],) or t.shape != (x.shape[0],):
        raise ValueError(f"flow_jvp needs s and t of shape [B] = [{x.shape[0]}]; got {tuple(s.shape)}, {tuple(t.shape)}")
    dx = torch.zeros_like(x) if dx is None else dx
    if dx.shape != x.shape:
        raise ValueError(f"tangent dx has shape {tuple(dx.shape)}, x has shape {tuple(x.shape)}")
    tangents = (dx, _as_time_tangent(ds, s, "ds"), _as_time_tangent(dt, t, "dt"))

    def fn(x_: torch.Tensor, s_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return model(x_, s_, t_, cond, output=output, check_times=False)

    def evaluate(f: Callable, primals: tuple, tangents_: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if backend == "fused":
            return f(*primals, *tangents_)
        return jvp(f, primals, tangents_, backend, fd_step)

    def fused(x_, s_, t_, *d):
        return model(x_, s_, t_, cond, output=output, check_times=False, tangents=d)

    if grad == "full":
        if tangent_dtype is not None:
            raise ValueError("tangent_dtype applies to stop-gradient tangents only (grad='primal' or 'none')")
        if backend == "func" and isinstance(model, nn.parallel.DistributedDataParallel):
            backend = "forward_ad"
        return evaluate(fused if backend == "fused" else fn, (x, s, t), tangents)

    if tangent_dtype is None and backend == "finite_difference":
        tangent_dtype = torch.float64
    if grad == "primal" and backend == "fused" and tangent_dtype in (None, x.dtype):
        # one pass: a gradient-carrying output beside a tangent computed without gradient
        primal, tangent = model(x, s, t, cond, output=output, check_times=False, tangents=tangents, tangent_grad=False)
        return primal, tangent.detach()
    replay = RandomReplay(x.device)
    with torch.no_grad():
        if tangent_dtype is not None and tangent_dtype != x.dtype:
            cast = lambda z: z.to(tangent_dtype)  # noqa: E731
            primal, tangent = evaluate(_in_dtype(model, cond, output, tangent_dtype, backend == "fused"),
                                       (cast(x), cast(s), cast(t)), tuple(cast(d) for d in tangents))
            primal, tangent = primal.to(x.dtype), tangent.to(x.dtype)
        else:
            primal, tangent = evaluate(fused if backend == "fused" else fn, (x, s, t), tangents)
    tangent = tangent.detach()
    if grad == "none":
        return primal.detach(), tangent
    replay.restore()
    return fn(x, s, t), tangent


__all__ = ["JVP_BACKENDS", "FN_BACKENDS", "GRAD_MODES", "RandomReplay", "check_backend", "resolve_backend", "jvp",
           "flow_jvp"]
