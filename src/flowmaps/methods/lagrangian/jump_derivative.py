"""The Lagrangian family's one JVP: the jump ``F(x_s, s, t)`` and its time derivative ``d/dt F``."""

import torch
from torch import nn

from flowmaps.jvp import flow_jvp
from flowmaps.methods.skeleton import Draw


def jump_and_derivative(model: nn.Module, draw: Draw, backend: str, grad: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F(x_s, s, t), d/dt F(x_s, s, t))`` on the pair rows: one JVP along ``(0, 0, 1)``."""
    return flow_jvp(model, draw.x_s, draw.s, draw.t, draw.pair.cond, dt=1.0, output="F", backend=backend, grad=grad)
