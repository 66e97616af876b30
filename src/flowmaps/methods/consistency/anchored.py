"""Discrete-time consistency losses ``w(s, r) d(F(x_s, s, 0), sg[F_target(x_r, r, 0)])`` (CT, iCT, CD, ECT).

Discrete-time methods compare the map at two neighbouring times of one path, ``s > r``:

    L = E w(s, r) d(F(x_s, s, 0), sg[F_target(x_r, r, 0)]),

where ``x_r`` comes from ``x_s`` by a teacher ODE step (CD) or from the same ``(x_0, eps)`` (CT),
``d`` is the squared error or a robust penalty (pseudo-Huber, ``flowmaps.weighting``) and
``F_target`` the target network (``flowmaps.methods.targets``: the method's own EMA at the paper's
rate, or the online weights). The draw's pair rows carry the interval: ``s`` and ``t = r``.
"""

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from flowmaps.methods.options import TargetOptions, TimeOptions, WeightingOptions, option, require
from flowmaps.methods.skeleton import Batch, Draw, LossContext, LossTerms, SkeletonMethod
from flowmaps.time_args import expand_like

STEP_WEIGHTINGS = ("uniform", "inverse_step")
CURRICULA = ("fixed", "ct", "ict")
SOLVERS = ("euler", "heun")


def ct_num_steps(step: int, total_steps: int, initial: int = 2, final: int = 150) -> int:
    """Intervals of the CT curriculum (Song et al. 2023, App. C) at training step ``k = step``.

    The paper's ``N(k) = ceil(sqrt(k / K ((s_1 + 1)^2 - s_0^2) + s_0^2) - 1) + 1`` discretisation
    points give ``N(k) - 1`` intervals: from ``s_0 - 1`` at the start to ``s_1`` at the end.
    """
    frac = min(max(step, 0), total_steps) / max(total_steps, 1)
    points = math.ceil(math.sqrt(frac * ((final + 1) ** 2 - initial**2) + initial**2) - 1) + 1
    return max(points - 1, 1)


def ict_num_steps(step: int, total_steps: int, initial: int = 10, final: int = 1280) -> int:
    """Intervals of the iCT curriculum (Song & Dhariwal 2023, Eq. 7): doubling from ``s_0`` to ``s_1``.

    ``N(k) = min(s_0 2^floor(k / K'), s_1) + 1`` points, ``K' = floor(K / (log2 floor(s_1 / s_0) + 1))``,
    so ``min(s_0 2^floor(k / K'), s_1)`` intervals.
    """
    stages = int(math.log2(max(final // initial, 1))) + 1
    per_stage = max(total_steps // stages, 1)
    return min(initial * 2 ** (max(step, 0) // per_stage), final)


def ct_target_decay(mu0: float, initial_points: int, num_steps: int) -> float:
    """CT's EMA target rate ``mu(k) = exp(s_0 log mu_0 / N(k))`` (Song et al. 2023, App. C) with
    ``N(k) = num_steps + 1`` discretisation points: ``mu_0`` at the start, nearer 1 as the grid refines."""
    if mu0 == 0.0:
        return 0.0
    return math.exp(initial_points * math.log(mu0) / (num_steps + 1))


def teacher_step(
    teacher: Any, x: torch.Tensor, s: torch.Tensor, r: torch.Tensor, cond: Optional[torch.Tensor], solver: str
) -> torch.Tensor:
    """One ODE step of the teacher's velocity from ``s`` to ``r``: Euler or Heun (no gradient).

    Euler: ``x + (r - s) v_T(x, s)``; Heun: ``x + (r - s) (v_T(x, s) + v_T(x_E, r)) / 2`` with ``x_E``
    the Euler point.
    """
    with torch.no_grad():
        gap = expand_like(r - s, x)
        v = teacher.velocity(x, s, cond)
        euler = x + gap * v
        if solver == "euler":
            return euler
        return x + gap * 0.5 * (v + teacher.velocity(euler, r, cond))


@dataclass
class AnchoredOptions(TimeOptions, WeightingOptions, TargetOptions):
    """What every anchored consistency loss carries: times, the penalty and the target network."""

    penalty_c: Optional[float] = option(None, "scale c of the robust penalty (None: iCT's 0.00054 sqrt(D))")
    target: str = option("ema", "target network (the method's own EMA, target_ema_decay)")
    weighting: str = option("uniform", "step weight (inverse_step: 1 / (s - r), iCT)", choices=STEP_WEIGHTINGS)


@dataclass
class GridCurriculumOptions(AnchoredOptions):
    """The discretisation grid of CT and CD: ``N`` intervals, fixed or by a curriculum."""

    curriculum: str = option("fixed", "grid curriculum (ct: Song et al. 2023; ict: doubling)", choices=CURRICULA)
    initial_steps: int = option(2, "intervals N at the start of the curriculum")
    final_steps: int = option(150, "intervals N at the end of the curriculum (the fixed grid's N)", within="[1, inf)")

    def check_group(self, method: str) -> None:
        require(self.curriculum == "fixed" or 1 <= self.initial_steps <= self.final_steps,
                method, "initial_steps and final_steps", "satisfy 1 <= initial_steps <= final_steps for a curriculum",
                (self.initial_steps, self.final_steps))


class AnchoredConsistency(SkeletonMethod):
    """``w(s, r) d(F(x_s, s, 0), sg[F_target(x_r, r, 0)])`` (module docstring); subclasses give the interval
    (``pair_times``) and ``previous_point``."""

    rule = "eulerian"
    sampler = "consistency"

    @abstractmethod
    def previous_point(self, draw: Draw) -> torch.Tensor:
        """The point ``x_r`` of the path through ``x_s`` at the earlier time ``r = draw.t``."""

    def curriculum_state(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        """Diagnostics of the step schedule (none by default)."""
        return {}

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        s, r, cond = draw.s, draw.t, draw.pair.cond
        zero = torch.zeros_like(s)
        with torch.no_grad():
            x_r = self.previous_point(draw)
        target = self.target(model, ctx, x_r, r, zero, cond)
        pred = model(draw.x_s, s, zero, cond, check_times=False)
        per_example = self.weighting(pred - target, s, zero)
        if self.options.weighting == "inverse_step":
            per_example = per_example / (s - r)
        terms.add("consistency", per_example)
        for key, value in {**self.curriculum_state(ctx), "step_size": (s - r).mean()}.items():
            terms.log(key, value)


class GridCellConsistency(AnchoredConsistency):
    """An anchored consistency loss on the cells of a uniform grid of ``N`` intervals (CT, CD)."""

    def num_steps(self, ctx: LossContext) -> int:
        """Grid intervals ``N`` at this point of training."""
        o = self.options
        if o.curriculum == "ct":
            return ct_num_steps(ctx.step, ctx.total_steps, o.initial_steps, o.final_steps)
        if o.curriculum == "ict":
            return ict_num_steps(ctx.step, ctx.total_steps, o.initial_steps, o.final_steps)
        return o.final_steps

    def pair_times(self, pair: Batch, generator: torch.Generator, ctx: LossContext,
                   progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, r)``, ``s > r``: the grid cell ``[(i - 1)/N, i/N]`` holding a draw of ``time_distribution``
        (a logit-normal draw gives iCT's discretised log-normal over noise levels)."""
        steps = self.num_steps(ctx)
        u = self.pairs.times(pair.x0.shape[0], generator, pair.x0.device).to(pair.x0.dtype)
        i = torch.ceil(u * steps).clamp(1, steps)
        return i / steps, (i - 1) / steps

    def curriculum_state(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        """Diagnostics of the discretisation curriculum: the number of grid intervals."""
        return {"num_steps": torch.tensor(float(self.num_steps(ctx)))}
