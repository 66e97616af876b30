"""Exact flow maps of small mixtures for the steering tests (any sample shape) and an NFE meter."""

from __future__ import annotations

import math

from torch import nn

from flowmaps.flow_map import FlowMap
from flowmaps.oracle import ExactAverageVelocity, GaussianMixture

SQUARE = GaussianMixture([0.25] * 4, [[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]], 0.4,
                         labels=[0, 0, 1, 1])


class Shaped(nn.Module):
    """An exact backbone on ``[B, *shape]`` samples: flattened for the oracle, reshaped back."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.exact = ExactAverageVelocity(mixture)

    def forward(self, x, s, t, cond=None):
        return self.exact(x.flatten(1), s, t, cond).reshape(x.shape)


def exact_model(mixture: GaussianMixture = SQUARE, shape: tuple[int, ...] | None = None) -> FlowMap:
    shape = shape or (mixture.dim,)
    assert math.prod(shape) == mixture.dim
    return FlowMap(Shaped(mixture), shape=shape, num_classes=mixture.num_classes)


class Meter(nn.Module):
    """Counts network evaluations of a flow map: forward calls, plus two per backward pass through one."""

    def __init__(self, model: FlowMap):
        super().__init__()
        self.model, self.shape, self.forwards, self.backwards = model, model.shape, 0, 0

    @property
    def nfe(self) -> int:
        return self.forwards + 2 * self.backwards

    def forward(self, x, *args, **kwargs):
        self.forwards += 1
        out = self.model(x, *args, **kwargs)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad):
        self.backwards += 1
        return grad
