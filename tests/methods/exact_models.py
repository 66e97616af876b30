"""Models built on the exact oracle, for testing losses at the true flow map."""

import torch
from torch import nn

from flowmaps.flow_map import FlowMap
from flowmaps.oracle import ExactAverageVelocity, GaussianMixture


class PerturbedExact(nn.Module):
    """``V = V_exact + delta * g(x, s, t)`` with a scalar parameter ``delta`` (0 at the exact map).

    Wrong variants that losses must reject:

    - ``"time_reversed"``: the opposite convention (t = 0 noise, t = 1 data),
      ``V'(x, s, t) = -V_exact(x, 1 - s, 1 - t)``. It is a valid flow map of the reversed ODE, so only
      losses that tie the map to the data (diagonal, teacher, conditional terms) can reject it.
    - ``"sign_flipped"``: ``F = x - (t - s) V_exact``, not a flow map at all; every rule rejects it.
    """

    def __init__(self, target: GaussianMixture, variant: str = "exact"):
        super().__init__()
        self.exact = ExactAverageVelocity(target)
        self.delta = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.variant = variant

    def forward(self, x, s, t, cond=None):
        if self.variant == "time_reversed":
            base = -self.exact(x, 1 - s, 1 - t)
        elif self.variant == "sign_flipped":
            base = -self.exact(x, s, t)
        else:
            base = self.exact(x, s, t)
        return base + self.delta * torch.tanh(x) * (1 + s + t)[:, None]


def exact_model(target: GaussianMixture, variant: str = "exact") -> FlowMap:
    return FlowMap(PerturbedExact(target, variant))
