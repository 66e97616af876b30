"""Teachers: anything that yields the velocity ``v(x, t)`` in this project's convention.

- ``ExactTeacher``: the exact marginal velocity of a Gaussian mixture (``--teacher exact`` when the
  data is a mixture), so that distillation can be judged without a learned teacher's error.
- ``FlowMapTeacher``: a trained run (``--teacher RUN_DIR``); its velocity is the diagonal
  ``V(x, t, t)`` and its full map ``F(x, s, t)`` is available to methods that distil a flow map.

Teachers from other conventions are converted here, at the edge, never in the methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import torch

from flowmaps.data import DataSource
from flowmaps.flow_map import FlowMap
from flowmaps.oracle import GaussianMixture


@runtime_checkable
class Teacher(Protocol):
    """``velocity(x, t, cond=None)`` with ``t`` a ``[B]`` tensor, in this convention (t = 0 data)."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class ExactTeacher:
    """The exact velocity of a Gaussian mixture (computed in float64, returned in ``x``'s dtype)."""

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.mixture.velocity(x, t)

    def flow_map(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None):
        return self.mixture.flow_map(x, s, t)


class FlowMapTeacher:
    """A frozen ``FlowMap`` used as a teacher: velocity from its diagonal, jumps from ``F``."""

    def __init__(self, model: FlowMap):
        self.model = model.eval().requires_grad_(False)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(x, t, t, cond, output="V", check_times=False)

    def flow_map(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None):
        return self.model(x, s, t, cond, check_times=False)


def load_teacher(spec: str, data: DataSource, device: torch.device) -> Teacher:
    """``"exact"`` (the data must be a Gaussian mixture) or the path of a trained run directory."""
    if spec == "exact":
        if data.mixture is None:
            raise ValueError(
                f"--teacher exact needs Gaussian-mixture data (a mixture spec file, 8gaussians or ring); "
                f"{data.name!r} has no exact velocity"
            )
        return ExactTeacher(data.mixture)
    from flowmaps.runs import load

    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"teacher {spec!r} is neither 'exact' nor a run directory")
    return FlowMapTeacher(load(path, ema=True, device=device))
