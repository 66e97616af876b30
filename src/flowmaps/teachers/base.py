"""Teachers: anything that yields the velocity ``v(x, t)`` in this project's convention.

- ``ExactTeacher``: the exact marginal velocity of a Gaussian mixture (``--teacher exact`` when the
  data is a mixture), so that distillation can be judged without a learned teacher's error.
- ``FlowMapTeacher``: a trained run (``--teacher RUN_DIR``); its velocity is the diagonal
  ``V(x, t, t)`` and its full map ``F(x, s, t)`` is available to methods that distil a flow map.
- ``VelocityTeacher``: any callable ``v(x, t)``; ``time_reversed=True`` converts a velocity written
  in the flow-matching convention (``tau = 0`` noise, ``tau = 1`` data) to this one.

Teachers from other conventions are converted here, at the edge, never in the methods. Teacher
velocities stay differentiable in ``x`` (their parameters are frozen): LMD back-propagates through
``v_T(F(x_s, s, t), t)`` into the student's jump.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from flowmaps.flow_map import FlowMap
from flowmaps.oracle import GaussianMixture
from flowmaps.time_args import TimeLike, as_batch_time


@runtime_checkable
class Teacher(Protocol):
    """``velocity(x, t, cond=None)`` with ``t`` a ``[B]`` tensor, in this convention (t = 0 data)."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class ExactTeacher:
    """The exact velocity of a Gaussian mixture (computed in float64, returned in ``x``'s dtype) and its
    flow map, the float64 Dormand-Prince solve at ``rtol``/``atol``. The defaults (1e-6, 1e-7) sit
    below float32 resolution of training targets and cost about 2.5x less than the 1e-9 of the
    benchmark's reference maps (PFMM calls the teacher's map twice per step).

    ``x`` may have any shape ``[B, ...]`` whose features number the mixture's dimension (image-shaped
    mixture data): it is flattened for the mixture and the answer reshaped back. ``cond`` (``[B]``
    labels, -1 for none) conditions each row on its class (the mixture must be labelled)."""

    def __init__(self, mixture: GaussianMixture, rtol: float = 1e-6, atol: float = 1e-7):
        self.mixture = mixture
        self.rtol, self.atol = rtol, atol

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.mixture.velocity(x.reshape(x.shape[0], -1), t, cond).reshape(x.shape)

    def flow_map(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None,
                 guidance: Optional[float] = None):
        """``F(x, s, t)``; with ``guidance`` ``w`` the guided map ``F_w`` (spec §7)."""
        flat = x.reshape(x.shape[0], -1)
        return self.mixture.flow_map(flat, s, t, cond, rtol=self.rtol, atol=self.atol,
                                     guidance=guidance).reshape(x.shape)


class FlowMapTeacher:
    """A frozen ``FlowMap`` used as a teacher: velocity from its diagonal, jumps from ``F``."""

    def __init__(self, model: FlowMap):
        self.model = model.eval().requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(x, t, t, cond, output="V", check_times=False)

    def flow_map(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None):
        return self.model(x, s, t, cond, check_times=False)


class VelocityTeacher:
    """A teacher from any velocity callable ``fn(x, t) -> v`` with ``t`` a ``[B]`` tensor.

    With ``time_reversed=True`` the callable is in the flow-matching convention (``tau = 0`` noise,
    ``tau = 1`` data, ``x_tau = tau x_0 + (1 - tau) eps``); its path is ours run backwards, so
    ``v(x, t) = -fn(x, 1 - t)``. A conditional teacher closes over its condition (``cond`` is not
    forwarded).
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], time_reversed: bool = False):
        if not callable(fn):
            raise TypeError(f"VelocityTeacher needs a callable v(x, t); got {type(fn).__name__}")
        self.fn = fn
        self.time_reversed = time_reversed

    def velocity(self, x: torch.Tensor, t: TimeLike, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        tb = as_batch_time(t, x)
        v = -self.fn(x, 1 - tb) if self.time_reversed else self.fn(x, tb)
        if v.shape != x.shape:
            raise ValueError(f"teacher velocity has shape {tuple(v.shape)} for x of shape {tuple(x.shape)}")
        return v


__all__ = ["Teacher", "ExactTeacher", "FlowMapTeacher", "VelocityTeacher"]
