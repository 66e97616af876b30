"""Compositional methods: train ``F(F(x_s, s, u), u, t) = F(x_s, s, t)`` (spec §2).

The compositional rule needs no derivative, only sequential calls of the map. With
``F = x + (t - s) V`` it reads, in average-velocity form,

    (t - s) V(x_s, s, t) = (u - s) V(x_s, s, u) + (t - u) V(F(x_s, s, u), u, t),

so the big step's average velocity is the length-weighted mean of the two small steps' ones. With
the boundary condition ``F(x, t, t) = x`` (built into ``FlowMap``) the rule alone does not pin the
map to the data: every method adds something that does (the diagonal loss, a teacher, or the
conditional velocity). All methods here split the batch (spec §3): the first
``round(diagonal_fraction * B)`` examples train the diagonal, the rest the rule.

Convention: t = 0 data, t = 1 noise, pairs ``s >= t`` (sampling direction) unless a method says
otherwise; ``sg[.]`` is a stop-gradient (computed under ``torch.no_grad``).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Callable, Optional

import torch
from torch import nn

from flowmaps.jvp import check_backend, flow_jvp
from flowmaps.methods.base import Batch, LossContext, LossOutput, Method, mean_square
from flowmaps.methods.diagonal import diagonal_residual
from flowmaps.methods.registry import register
from flowmaps.schedules import Schedule
from flowmaps.time_args import expand_like
from flowmaps.time_pairs import TimePairSampler

Diagnostics = dict[str, torch.Tensor]


class _DiagonalPlusRule(Method):
    """Shared skeleton: a diagonal loss on part of the batch and a rule loss on the rest.

    Subclasses implement ``rule_loss`` (per-example losses of the off-diagonal part) and may
    override ``diagonal_loss`` (default: the conditional flow-matching loss
    ``|V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2``) and ``rule_times`` (default: the pairs of the
    ``TimePairSampler``).
    """

    rule = "compositional"
    rule_term = "compositional"

    def __init__(
        self,
        schedule: Schedule,
        diagonal_fraction: float,
        time_distribution: str = "uniform",
        direction: str = "backward",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
    ):
        super().__init__(schedule)
        self.pairs = TimePairSampler(diagonal_fraction, time_distribution, direction=direction,
                                     logit_mean=logit_mean, logit_std=logit_std)

    def diagonal_loss(
        self, model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Per-example diagonal loss; default ``|V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2``."""
        return mean_square(diagonal_residual(model, self.schedule, x0, eps, t, cond))

    def rule_times(
        self, s: torch.Tensor, t: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(s, t)`` pairs of the rule part; default: those of the pair sampler."""
        return s, t

    @abstractmethod
    def rule_loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        eps: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor],
        generator: torch.Generator,
        ctx: LossContext,
    ) -> tuple[torch.Tensor, Diagnostics]:
        """Per-example losses ``[n]`` of the rule part and detached diagnostics."""

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        ctx = ctx if ctx is not None else LossContext()
        x0 = batch.x0
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        pairs = self.pairs.sample(x0.shape[0], generator, x0.device)
        n_diag = pairs.t_diag.shape[0]
        diag, off = batch.take(slice(0, n_diag)), batch.take(slice(n_diag, None))
        per_example, terms, diagnostics = [], {}, {}
        if n_diag > 0:
            loss_diag = self.diagonal_loss(model, diag.x0, eps[:n_diag], pairs.t_diag.to(x0.dtype), diag.cond)
            per_example.append(loss_diag)
            terms["diagonal"] = loss_diag.mean().detach()
        if off.x0.shape[0] > 0:
            s, t = self.rule_times(pairs.s.to(x0.dtype), pairs.t.to(x0.dtype), generator)
            loss_rule, diagnostics = self.rule_loss(model, off.x0, eps[n_diag:], s, t, off.cond, generator, ctx)
            per_example.append(loss_rule)
            terms[self.rule_term] = loss_rule.mean().detach()
        return LossOutput(torch.cat(per_example).mean(), terms, diagnostics)


class _ProgressiveSelfDistillation(_DiagonalPlusRule):
    """PSD: diag + ``|F(x_s, s, t) - sg[F(F(x_s, s, u), u, t)]|^2`` (``split`` picks ``u``)."""

    setting = "self-distillation"
    cost = 8
    split = ""

    def __init__(
        self,
        schedule: Schedule,
        diagonal_fraction: float = 0.75,
        time_distribution: str = "uniform",
        direction: str = "backward",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
    ):
        super().__init__(schedule, diagonal_fraction, time_distribution, direction, logit_mean, logit_std)

    def rule_loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        eps: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor],
        generator: torch.Generator,
        ctx: LossContext,
    ) -> tuple[torch.Tensor, Diagnostics]:
        if self.split == "uniform":
            u = t + torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype) * (s - t)
        else:
            u = 0.5 * (s + t)
        x_s = self.schedule.sample_xt(x0, eps, s)
        with torch.no_grad():
            target = model(model(x_s, s, u, cond, check_times=False), u, t, cond, check_times=False)
        jump = model(x_s, s, t, cond, check_times=False)
        return mean_square(jump - target), {}


@register
class PSDUniform(_ProgressiveSelfDistillation):
    """Progressive self-distillation, uniform split: diag + ``|F(x_s,s,t) - sg[F(F(x_s,s,u),u,t)]|^2``, ``u ~ U[t, s]``.

    Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model: learning flow maps via
    self-distillation" (arXiv 2505.18825), in this convention (t = 0 data, ``s >= t``):

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{s >= t, u ~ U[t, s]} |F(x_s, s, t) - sg[F(F(x_s, s, u), u, t)]|^2``.

    The one-step jump is the student; the two-step composition of the same (online) weights is the
    target under stop-gradient, so the diagonal's accuracy propagates to ever longer jumps. No EMA.
    """

    name = "psd-u"
    split = "uniform"


@register
class PSDMidpoint(_ProgressiveSelfDistillation):
    """Progressive self-distillation, midpoint split: as ``psd-u`` with ``u = (s + t) / 2``.

    Boffi, Albergo & Vanden-Eijnden 2025 (arXiv 2505.18825), in this convention:

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{s >= t} |F(x_s, s, t) - sg[F(F(x_s, s, (s+t)/2), (s+t)/2, t)]|^2``,

    stop-gradient on the two half jumps (online weights, no EMA).
    """

    name = "psd-m"
    split = "midpoint"


@register
class Shortcut(_DiagonalPlusRule):
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
    other level is exactly the compositional rule at the midpoint. The target uses the EMA weights
    (``ctx.ema_model``, the paper's default); without one it falls back to the online weights
    under stop-gradient. ``diagonal_fraction = 0.75`` is the paper's one bootstrap example in four.
    """

    name = "shortcut"
    setting = "self-distillation"
    cost = 8

    def __init__(
        self,
        schedule: Schedule,
        diagonal_fraction: float = 0.75,
        max_steps: int = 128,
        time_distribution: str = "uniform",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
    ):
        if max_steps < 1 or max_steps & (max_steps - 1):
            raise ValueError(f"max_steps must be a power of two (1, 2, 4, ..., 128); got {max_steps}")
        super().__init__(schedule, diagonal_fraction, time_distribution, "backward", logit_mean, logit_std)
        self.max_steps = max_steps
        self.levels = int(math.log2(max_steps))

    def rule_times(
        self, s: torch.Tensor, t: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dyadic steps ``d = 2^-k`` (``k`` uniform in ``0..log2 M``) and starts on the ``d`` grid."""
        level = torch.randint(0, self.levels + 1, s.shape, generator=generator, device=s.device)
        sections = 2**level
        d = 1.0 / sections.to(s.dtype)
        start = torch.floor(torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype) * sections)
        start = torch.minimum(start, (sections - 1).to(s.dtype))
        s_new = (start + 1) * d
        return s_new, (s_new - d).clamp(min=0.0)

    def rule_loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        eps: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor],
        generator: torch.Generator,
        ctx: LossContext,
    ) -> tuple[torch.Tensor, Diagnostics]:
        h = 0.5 * (s - t)
        finest = h < 0.75 / self.max_steps  # half step 1/(2M): use the velocity
        target_model = ctx.ema_model if ctx.ema_model is not None else model
        x_s = self.schedule.sample_xt(x0, eps, s)
        with torch.no_grad():
            mid = s - h
            v1 = target_model(x_s, s, torch.where(finest, s, mid), cond, output="V", check_times=False)
            x_mid = x_s - expand_like(h, x_s) * v1
            v2 = target_model(x_mid, mid, torch.where(finest, mid, t), cond, output="V", check_times=False)
            target = 0.5 * (v1 + v2)
        v = model(x_s, s, t, cond, output="V", check_times=False)
        return mean_square(v - target), {"step_size": (s - t).mean()}


@register
class SplitMeanFlow(_DiagonalPlusRule):
    """SplitMeanFlow: teacher diag + ``|V(x_s,s,t) - sg[l V(x_s,s,u) + (1-l) V(F(x_s,s,u),u,t)]|^2``.

    Guo et al. 2025, "SplitMeanFlow: interval splitting consistency in few-step generative
    modeling" (arXiv 2507.16884): shortcut models with unequal splits. The paper's interval
    ``[r, t]`` with the split point ``s = (1 - l) t + l r`` is, in this convention (``s >= t``,
    sampling direction), the interval ``[t, s]`` split at ``u = s + l (t - s)``, ``l ~ U(0, 1)``:

    ``L = E_t |V(x_t, t, t) - v_T(x_t, t)|^2
        + E_{s >= t, l} |V(x_s, s, t) - sg[l V(x_s, s, u) + (1 - l) V(x_u, u, t)]|^2``,
    ``x_u = F(x_s, s, u)``.

    ``(t - s)`` times the target is ``(u - s) V(x_s, s, u) + (t - u) V(x_u, u, t)``, the
    compositional rule in average-velocity form. The boundary condition ``V(x, t, t) = v`` is
    taught by the teacher's velocity ``v_T`` (``--teacher RUN_DIR`` of a diffusion/``fm`` run, or
    ``exact``); the split target uses the online weights under stop-gradient.
    """

    name = "splitmeanflow"
    setting = "teacher"
    cost = 9
    needs_teacher = True

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        diagonal_fraction: float = 0.5,
        time_distribution: str = "uniform",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
    ):
        super().__init__(schedule, diagonal_fraction, time_distribution, "backward", logit_mean, logit_std)
        self.teacher = teacher

    def diagonal_loss(
        self, model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``|V(x_t, t, t) - v_T(x_t, t)|^2``: the boundary condition from the teacher."""
        x_t = self.schedule.sample_xt(x0, eps, t)
        with torch.no_grad():
            v_teacher = self.teacher.velocity(x_t, t, cond)
        return mean_square(model(x_t, t, t, cond, output="V", check_times=False) - v_teacher)

    def rule_loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        eps: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor],
        generator: torch.Generator,
        ctx: LossContext,
    ) -> tuple[torch.Tensor, Diagnostics]:
        lam = torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype)
        u = s + lam * (t - s)
        x_s = self.schedule.sample_xt(x0, eps, s)
        with torch.no_grad():
            v1 = model(x_s, s, u, cond, output="V", check_times=False)
            x_u = x_s + expand_like(u - s, x_s) * v1
            v2 = model(x_u, u, t, cond, output="V", check_times=False)
            lam_ = expand_like(lam, v1)
            target = lam_ * v1 + (1 - lam_) * v2
        v = model(x_s, s, t, cond, output="V", check_times=False)
        return mean_square(v - target), {}


@register
class FlowMapMatching(_DiagonalPlusRule):
    """Flow map matching: ``|F(y,t,s) - x_s|^2 + |d/dt' F(y,t,t')|_{t'=s} - (alpha' x_0 + sigma' eps)|^2``, ``y = F(x_s,s,t)``.

    Boffi, Albergo & Vanden-Eijnden 2024, "Flow map matching" (arXiv 2406.07507, Prop. "FMM"),
    in this convention. With ``y = F(x_s, s, t)`` the jump to ``t`` and back:

    ``L = E_{s, t in [0, 1]^2} [ |F(y, t, s) - x_s|^2
        + |d/dt' F(y, t, t')|_{t' = s} - (alpha'(s) x_0 + sigma'(s) eps)|^2 ]``.

    The first term is the inverse property ``F(., t, s) o F(., s, t) = id``; the second is the
    Lagrangian derivative of the return jump at its end, ``v(F(y, t, s), s) = v(x_s, s)`` at the
    true map, regressed on the conditional velocity. That regression is valid (MSE, evaluated at a
    function of ``x_s``), so the loss is minimised by the true map without a teacher. No
    stop-gradients: the gradient flows through both jumps. Pairs are drawn in both directions
    (``s > t`` and ``t > s``), so the model learns the map both ways (inversion included). The
    derivative is one forward-mode JVP along the tangent ``(0, 0, 1)`` of the return jump. With
    ``diagonal_fraction > 0`` part of the batch has ``s = t``, where the loss is flow matching.
    """

    name = "fmm"
    setting = "scratch"
    cost = 9
    rule_term = "fmm"

    def __init__(
        self,
        schedule: Schedule,
        diagonal_fraction: float = 0.0,
        time_distribution: str = "uniform",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
        jvp_backend: str = "auto",
    ):
        check_backend(jvp_backend)
        super().__init__(schedule, diagonal_fraction, time_distribution, "both", logit_mean, logit_std)
        self.jvp_backend = jvp_backend

    def rule_loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        eps: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor],
        generator: torch.Generator,
        ctx: LossContext,
    ) -> tuple[torch.Tensor, Diagnostics]:
        x_s = self.schedule.sample_xt(x0, eps, s)
        y = model(x_s, s, t, cond, check_times=False)
        x_back, velocity = flow_jvp(model, y, t, s, cond, dt=1.0, output="F", backend=self.jvp_backend, grad="full")
        inverse = mean_square(x_back - x_s)
        matching = mean_square(velocity - self.schedule.conditional_velocity(x0, eps, s))
        return inverse + matching, {"inverse": inverse.mean().detach(), "matching": matching.mean().detach()}


@register
class ProgressiveFlowMapMatching(_DiagonalPlusRule):
    """Progressive flow map matching: ``|F(x_s, s, t) - F_T(F_T(x_s, s, u), u, t)|^2`` with a flow-map teacher.

    Boffi, Albergo & Vanden-Eijnden 2024, "Flow map matching" (arXiv 2406.07507, progressive
    FMM): a student learns in one jump what a pretrained flow map ``F_T`` does in
    ``teacher_steps`` jumps over the uniform subdivision ``s = u_0 > u_1 > ... > u_K = t``:

    ``L = E_{s >= t} |F(x_s, s, t) - F_T(... F_T(F_T(x_s, u_0, u_1), u_1, u_2) ..., u_{K-1}, u_K)|^2``

    (``K = 2``: the midpoint composition of the spec). The teacher is frozen (no gradient, no EMA);
    it needs ``flow_map(x, s, t, cond)``: ``--teacher RUN_DIR`` of a flow-map run, or ``exact`` for
    Gaussian-mixture data. The diagonal is not trained (the student never sees ``s = t``).
    """

    name = "pfmm"
    setting = "teacher"
    cost = 5
    needs_teacher = True
    rule_term = "pfmm"

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        teacher_steps: int = 2,
        time_distribution: str = "uniform",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
    ):
        if teacher_steps < 1:
            raise ValueError(f"teacher_steps must be a positive number of teacher jumps; got {teacher_steps}")
        super().__init__(schedule, 0.0, time_distribution, "backward", logit_mean, logit_std)
        self.teacher = teacher
        self.teacher_steps = teacher_steps

    def _teacher_flow_map(self) -> Callable[..., torch.Tensor]:
        flow_map = getattr(self.teacher, "flow_map", None)
        if not callable(flow_map):
            raise ValueError(
                f"pfmm needs a flow-map teacher with flow_map(x, s, t, cond) (--teacher RUN_DIR of a flow-map run, "
                f"or exact); got {type(self.teacher).__name__}"
            )
        return flow_map

    def rule_loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        eps: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor],
        generator: torch.Generator,
        ctx: LossContext,
    ) -> tuple[torch.Tensor, Diagnostics]:
        flow_map = self._teacher_flow_map()
        x_s = self.schedule.sample_xt(x0, eps, s)
        with torch.no_grad():
            target = x_s
            for k in range(self.teacher_steps):
                a = s + (t - s) * (k / self.teacher_steps)
                b = s + (t - s) * ((k + 1) / self.teacher_steps)
                target = flow_map(target, a, b, cond)
        jump = model(x_s, s, t, cond, check_times=False)
        return mean_square(jump - target), {}
