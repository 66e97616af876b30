"""Shortcut models (Frans, Hafner, Levine & Abbeel 2024, arXiv 2410.12557)."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from flowmaps.methods.options import (
    DiagonalSplitOptions, DiagonalTargetOptions, GridOptions, TargetOptions, TimeOptions, WeightingOptions, option,
    require,
)
from flowmaps.methods.registry import register
from flowmaps.methods.skeleton import Batch, Draw, LossContext, LossTerms, SkeletonMethod
from flowmaps.time_args import expand_like


@register
class Shortcut(SkeletonMethod):
    """Shortcut models: diag + ``|V(x,s,s-2h) - sg[(V(x,s,s-h) + V(x',s-h,s-2h))/2]|^2`` on a dyadic grid.

    Frans, Hafner, Levine & Abbeel 2024, "One step diffusion via shortcut models" (arXiv
    2410.12557). The paper's model ``s(x_t, t, d)`` (t = 0 noise there) is the average velocity
    conditioned on the step size ``d``; here the step size is the interval ``t - s`` the backbone
    already sees, and its ``d = 0`` flow-matching level is the diagonal. In this convention, with a
    step ``d = 2h`` drawn uniformly from the levels ``{1, 1/2, ..., 1/M}`` (``M = max_steps``) and a
    start ``s`` uniform on the grid ``{d, 2d, ..., 1}``:

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{d, s} |V(x_s, s, s - d) - sg[(V(x_s, s, s - h) + V(x', s - h, s - d)) / 2]|^2``,
    ``x' = x_s - h V(x_s, s, s - h) = F(x_s, s, s - h)``.

    At the finest level (``h = 1/(2M)``) the half steps use the diagonal ``V(x, s, s)`` (the
    velocity), as the reference implementation treats its smallest step as flow matching; every
    other level is exactly the compositional rule at the midpoint. The target uses the trainer's EMA
    weights (``target="trainer"``, the paper's default); without one it falls back to the online weights
    under stop-gradient. ``diagonal_fraction = 0.75`` is the paper's one bootstrap example in four.
    """

    name = "shortcut"
    rule = "compositional"
    setting = "self-distillation"
    cost = 8

    @dataclass
    class Options(TimeOptions, DiagonalSplitOptions, WeightingOptions, DiagonalTargetOptions, TargetOptions,
                  GridOptions):
        max_steps: int = option(128, "finest grid M (a power of two): steps d in {1, 1/2, ..., 1/M}")
        target: str = option("trainer", "target network (the trainer's EMA, the paper's default)")

        def check_group(self, method: str) -> None:
            require(self.max_steps >= 1 and not self.max_steps & (self.max_steps - 1), method, "max_steps",
                    "be a power of two (1, 2, 4, ..., 128)", self.max_steps)

    def pair_times(self, pair: Batch, generator: torch.Generator, ctx: LossContext,
                   progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Dyadic steps ``d = 2^-k`` (``k`` uniform in ``0..log2 M``) and starts on the ``d`` grid."""
        n, device = pair.x0.shape[0], pair.x0.device
        level = torch.randint(0, int(math.log2(self.options.max_steps)) + 1, (n,), generator=generator, device=device)
        sections = 2**level
        d = 1.0 / sections.to(torch.float32)
        start = torch.floor(torch.rand(n, generator=generator, device=device) * sections)
        start = torch.minimum(start, (sections - 1).to(start.dtype))
        s = (start + 1) * d
        return s, (s - d).clamp(min=0.0)

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        h = 0.5 * (s - t)
        finest = h < 0.75 / self.options.max_steps  # half step 1/(2M): use the velocity
        mid = s - h
        v1 = self.target(model, ctx, x_s, s, torch.where(finest, s, mid), cond, output="V")
        x_mid = x_s - expand_like(h, x_s) * v1
        v2 = self.target(model, ctx, x_mid, mid, torch.where(finest, mid, t), cond, output="V")
        v = model(x_s, s, t, cond, output="V", check_times=False)
        terms.add("compositional", self.weighting(v - 0.5 * (v1 + v2), s, t))
        terms.log("step_size", (s - t).mean())
