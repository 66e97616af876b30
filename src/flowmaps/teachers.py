"""Teachers: anything that yields the velocity ``v(x, t)`` in this project's convention.

- ``ExactTeacher``: the exact marginal velocity of a Gaussian mixture (``--teacher exact`` when the
  data is a mixture), so that distillation can be judged without a learned teacher's error.
- ``FlowMapTeacher``: a trained run (``--teacher RUN_DIR``); its velocity is the diagonal
  ``V(x, t, t)`` and its full map ``F(x, s, t)`` is available to methods that distil a flow map.
- ``VelocityTeacher``: any callable ``v(x, t)``; ``time_reversed=True`` converts a velocity written
  in the flow-matching convention (``tau = 0`` noise, ``tau = 1`` data) to this one.
- ``EMATarget``: an exponential moving average of the online weights, the target network of
  self-distillation methods that use one (TVM).

Teachers from other conventions are converted here, at the edge, never in the methods. Teacher
velocities stay differentiable in ``x`` (their parameters are frozen): LMD back-propagates through
``v_T(F(x_s, s, t), t)`` into the student's jump.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from flowmaps.data import DataSource
from flowmaps.flow_map import FlowMap
from flowmaps.oracle import GaussianMixture
from flowmaps.schedules import Schedule
from flowmaps.time_args import TimeLike, as_batch_time


@runtime_checkable
class Teacher(Protocol):
    """``velocity(x, t, cond=None)`` with ``t`` a ``[B]`` tensor, in this convention (t = 0 data)."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class ExactTeacher:
    """The exact velocity of a Gaussian mixture (computed in float64, returned in ``x``'s dtype) and its
    flow map, the float64 Dormand-Prince solve at ``rtol``/``atol``. The defaults (1e-6, 1e-7) sit
    below float32 resolution of training targets and cost about 2.5x less than the 1e-9 of the
    benchmark's reference maps (PFMM calls the teacher's map twice per step)."""

    def __init__(self, mixture: GaussianMixture, rtol: float = 1e-6, atol: float = 1e-7):
        self.mixture = mixture
        self.rtol, self.atol = rtol, atol

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.mixture.velocity(x, t)

    def flow_map(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None):
        return self.mixture.flow_map(x, s, t, rtol=self.rtol, atol=self.atol)


class FlowMapTeacher:
    """A frozen ``FlowMap`` used as a teacher: velocity from its diagonal, jumps from ``F``."""

    def __init__(self, model: FlowMap):
        self.model = model.eval().requires_grad_(False)

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


class EMATarget:
    """``theta_target <- d theta_target + (1 - d) theta``, evaluated through the online model itself.

    The averaged weights live here, not in a copy of the module: ``__call__`` runs the online model
    (possibly wrapped by ``DistributedDataParallel``) with them via ``torch.func.functional_call``,
    without gradient, so nothing reaches into a wrapper. The first ``update`` copies the weights.
    """

    def __init__(self, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA target decay must lie in [0, 1); got {decay}")
        self.decay = decay
        self.state: Optional[dict[str, torch.Tensor]] = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = dict(model.named_parameters())
        if self.state is None or set(self.state) != set(current):
            self.state = {k: p.detach().clone() for k, p in current.items()}
            return
        for k, p in current.items():
            if self.state[k].device != p.device or self.state[k].dtype != p.dtype:  # e.g. loaded from a checkpoint
                self.state[k] = self.state[k].to(p.device, p.dtype)
            self.state[k].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (empty before the first update), for checkpoints."""
        return {} if self.state is None else {k: v.detach().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()} if state else None

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
        cond: Optional[torch.Tensor] = None, output: str = "V",
    ) -> torch.Tensor:
        if self.state is None:
            raise RuntimeError("EMATarget was called before its first update(model)")
        return torch.func.functional_call(model, self.state, (x, s, t, cond), {"output": output, "check_times": False})


def load_teacher(spec: str, data: DataSource, device: torch.device, schedule: Optional[Schedule] = None) -> Teacher:
    """``"exact"`` (the data must be a Gaussian mixture) or the path of a trained run directory.

    The exact teacher follows the training ``schedule`` (default: the mixture's own, linear).
    """
    if spec == "exact":
        if data.mixture is None:
            raise ValueError(
                f"--teacher exact needs Gaussian-mixture data (a mixture spec file, 8gaussians or ring); "
                f"{data.name!r} has no exact velocity"
            )
        return ExactTeacher(data.mixture if schedule is None else data.mixture.with_schedule(schedule))
    from flowmaps.runs import DATA_INFO_FILE, load

    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"teacher {spec!r} is neither 'exact' nor a run directory")
    info_file = path / DATA_INFO_FILE
    if info_file.is_file():
        dim = int(json.loads(info_file.read_text())["dim"])
        if dim != data.dim:
            raise ValueError(f"teacher run {path} was trained on {dim}-dimensional data; {data.name!r} has {data.dim}")
    return FlowMapTeacher(load(path, ema=True, device=device))
