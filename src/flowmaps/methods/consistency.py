"""Consistency models: maps anchored at ``t = 0`` (``F(x, s, 0)``) and consistency trajectory models.

A consistency model ``f(x, s)`` maps any point of a probability-flow path to the path's data end.
In this convention it is the two-time flow map evaluated at ``t = 0``: ``f(x, s) = F(x, s, 0)``,
and its boundary condition ``f(x, 0) = x`` is ``F(x, 0, 0) = x``, built into ``FlowMap``. The
consistency condition ``d/ds F(x_s, s, 0) = 0`` along a path is the Eulerian rule at ``t = 0``.
Discrete-time methods (CT, CD, iCT, ECT) compare the map at two neighbouring times of one path,
``s > r``:

    L = E w(s, r) d(F(x_s, s, 0), sg[F_target(x_r, r, 0)]),

where ``x_r`` comes from ``x_s`` by a teacher ODE step (CD) or from the same ``(x_0, eps)`` (CT),
``d`` is the squared error or a robust penalty (pseudo-Huber, ``flowmaps.weighting``) and
``F_target`` the network with the method's own EMA weights (``target_ema_decay``, the paper's
rate; kept by the method, saved in checkpoints through ``state_dict``, separate from the
trainer's evaluation EMA) or, at decay 0, the online weights. sCM takes the limit ``r -> s``; FACM adds a
flow-matching anchor; CTM generalises the comparison to two-time jumps ``F(x_s, s, t)``.

Methods anchored at ``t = 0`` train nothing but ``F(x, s, 0)``: sample them with
``flowmaps.samplers.sample_consistency`` (jump to data, re-noise, repeat); their class attribute
``multistep_sampler = "consistency"`` says so. ``F(x, s, t)`` with ``t > 0`` is untrained.

Convention: t = 0 data, t = 1 noise; ``sg[.]`` is a stop-gradient (``torch.no_grad``).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Optional

import torch
from torch import nn

from flowmaps.jvp import check_backend, flow_jvp
from flowmaps.methods.base import Batch, EMATargetState, LossContext, LossOutput, Method, mean_square
from flowmaps.methods.diagonal import diagonal_residual
from flowmaps.methods.registry import register
from flowmaps.schedules import Schedule
from flowmaps.time_args import expand_like
from flowmaps.time_pairs import TimePairSampler
from flowmaps.weighting import PENALTIES, adaptive_weight, penalty, squared_norm

WEIGHTINGS = ("uniform", "inverse_step")
CURRICULA = ("fixed", "ct", "ict")
SOLVERS = ("euler", "heun")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")


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


class _EMATargetMethod(EMATargetState, Method):
    """A method whose stop-gradient target uses its own EMA of the online weights (decay 0: none).

    ``theta^- <- d theta^- + (1 - d) sg[theta]`` at the start of every loss call
    (``flowmaps.teachers.EMATarget``); the averaged weights are training state, returned by
    ``state_dict`` so checkpoints and resumed runs carry them.
    """

    def __init__(self, schedule: Schedule, target_ema_decay: float):
        super().__init__(schedule)
        self.init_target(target_ema_decay)
        self.target_ema_decay = target_ema_decay

    def update_target(self, model: nn.Module, decay: float) -> None:
        """Move the EMA target towards ``model`` with rate ``decay`` (nothing for an online target)."""
        if self.target is not None:
            self.target.decay = decay
            self.target.update(model)

    def target_call(
        self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``sg[F_target(x, s, t)]``: the EMA weights, or the online ones at decay 0."""
        if self.target is not None:
            return self.target(model, x, s, t, cond, output="F")
        with torch.no_grad():
            return model(x, s, t, cond, check_times=False)


class _AnchoredConsistency(_EMATargetMethod):
    """Discrete-time consistency loss ``w(s, r) d(F(x_s, s, 0), sg[F_target(x_r, r, 0)])``.

    The interval ``[r, s]`` is a cell of the uniform grid ``{0, 1/N, ..., 1}`` (``N`` from the
    curriculum); the cell is the one holding a time drawn from ``time_distribution``, so a
    logit-normal draw gives iCT's discretised log-normal over noise levels (for the linear
    schedule ``logit(t) = log(sigma / alpha)``, the EDM noise level). Subclasses say where
    ``x_r`` comes from.
    """

    rule = "eulerian"
    multistep_sampler = "consistency"

    def __init__(
        self,
        schedule: Schedule,
        curriculum: str,
        initial_steps: int,
        final_steps: int,
        time_distribution: str,
        logit_mean: float,
        logit_std: float,
        penalty: str,
        penalty_c: Optional[float],
        weighting: str,
        target_ema_decay: float,
    ):
        super().__init__(schedule, target_ema_decay)
        _check_choice("curriculum", curriculum, CURRICULA)
        _check_choice("penalty", penalty, PENALTIES)
        _check_choice("weighting", weighting, WEIGHTINGS)
        if final_steps < 1 or (curriculum != "fixed" and not 1 <= initial_steps <= final_steps):
            raise ValueError(f"need final_steps >= 1 and, for a curriculum, 1 <= initial_steps <= final_steps; "
                             f"got initial_steps={initial_steps}, final_steps={final_steps}")
        if penalty_c is not None and penalty_c <= 0:
            raise ValueError(f"penalty_c must be positive (or None for 0.00054 sqrt(D)); got {penalty_c}")
        self.times = TimePairSampler(1.0, time_distribution, logit_mean=logit_mean, logit_std=logit_std)
        self.curriculum, self.initial_steps, self.final_steps = curriculum, initial_steps, final_steps
        self.penalty, self.penalty_c, self.weighting = penalty, penalty_c, weighting

    def num_steps(self, ctx: LossContext) -> int:
        """Grid intervals ``N`` at this point of training."""
        if self.curriculum == "ct":
            return ct_num_steps(ctx.step, ctx.total_steps, self.initial_steps, self.final_steps)
        if self.curriculum == "ict":
            return ict_num_steps(ctx.step, ctx.total_steps, self.initial_steps, self.final_steps)
        return self.final_steps

    def intervals(
        self, n: int, generator: torch.Generator, x0: torch.Tensor, ctx: LossContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, r)``, ``s > r``: the grid cell ``[(i - 1)/N, i/N]`` holding a draw of ``time_distribution``."""
        steps = self.num_steps(ctx)
        u = self.times.times(n, generator, x0.device).to(x0.dtype)
        i = torch.ceil(u * steps).clamp(1, steps)
        return i / steps, (i - 1) / steps

    def target_decay(self, ctx: LossContext) -> float:
        """The EMA target rate at this point of training: ``target_ema_decay`` (CT varies it with ``N``)."""
        return self.target_ema_decay

    def distance(self, residual: torch.Tensor) -> torch.Tensor:
        """Per-example penalty ``d``: ``"mse"`` is the mean square over features; the robust penalties
        (``flowmaps.weighting``) act on the squared Euclidean norm ``|R|^2`` summed over features, with
        ``c = penalty_c`` or iCT's ``0.00054 sqrt(D)``: pseudo-Huber ``sqrt(|R|^2 + c^2) - c``."""
        if self.penalty == "mse":
            return mean_square(residual)
        c = self.penalty_c if self.penalty_c is not None else 0.00054 * math.sqrt(residual[0].numel())
        return penalty(squared_norm(residual, "sum"), self.penalty, c)

    @abstractmethod
    def previous_point(
        self,
        x0: torch.Tensor,
        eps: torch.Tensor,
        x_s: torch.Tensor,
        s: torch.Tensor,
        r: torch.Tensor,
        cond: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """The point ``x_r`` of the path through ``x_s`` at the earlier time ``r``."""

    def curriculum_state(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        """Diagnostics of the discretisation curriculum: the number of grid intervals."""
        return {"num_steps": torch.tensor(float(self.num_steps(ctx)))}

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        ctx = ctx if ctx is not None else LossContext()
        self.update_target(model, self.target_decay(ctx))
        x0, cond = batch.x0, batch.cond
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        s, r = self.intervals(x0.shape[0], generator, x0, ctx)
        x_s = self.schedule.sample_xt(x0, eps, s)
        zero = torch.zeros_like(s)
        with torch.no_grad():
            x_r = self.previous_point(x0, eps, x_s, s, r, cond)
        target = self.target_call(model, x_r, r, zero, cond)
        pred = model(x_s, s, zero, cond, check_times=False)
        per_example = self.distance(pred - target)
        if self.weighting == "inverse_step":
            per_example = per_example / (s - r)
        loss = per_example.mean()
        diagnostics = {**self.curriculum_state(ctx), "step_size": (s - r).mean().detach()}
        return LossOutput(loss, {"consistency": loss.detach()}, diagnostics)


@register
class ConsistencyTraining(_AnchoredConsistency):
    """Consistency training: ``|F(x_s, s, 0) - sg[F_ema(x_r, r, 0)]|^2`` with ``x_s``, ``x_r`` from one ``(x_0, eps)``.

    Song, Dhariwal, Chen & Sutskever 2023, "Consistency models" (arXiv 2303.01469), in this
    convention (the consistency function is ``f(x, s) = F(x, s, 0)``, t = 0 data):

    ``L = E_{x_0, eps, i} |F(x_s, s, 0) - sg[F_ema(x_r, r, 0)]|^2``,
    ``x_s = alpha(s) x_0 + sigma(s) eps``, ``x_r = alpha(r) x_0 + sigma(r) eps``, ``r = s - 1/N``.

    Using the same ``(x_0, eps)`` is an Euler step with the conditional velocity (exact for the
    linear schedule); the loss tends to the distillation loss as ``N -> infinity``. ``N`` follows
    the paper's curriculum from ``initial_steps`` to ``final_steps`` (``curriculum="ct"``). The
    target uses the method's own EMA weights with the paper's rate ``mu(k) = exp(s_0 log mu_0 /
    N(k))`` (``N(k)`` grid points, ``s_0 = initial_steps``, ``mu_0 = target_ema_decay = 0.9``, the
    paper's CIFAR-10 value; a fixed curriculum keeps ``mu_0``; 0 uses the online weights). Its
    recipes (``penalty``, ``weighting``, ``target_ema_decay``, ``curriculum``) are options; ``ict``
    is a preset of them. An EMA target moves information about one grid interval per EMA time
    constant, so short runs need a coarse grid; ``weighting="inverse_step"`` keeps the loss from
    shrinking like ``(s - r)^2`` as the curriculum refines the grid (``docs/methods.md``).
    """

    name = "ct"
    setting = "scratch"
    cost = 4

    def __init__(
        self,
        schedule: Schedule,
        curriculum: str = "ct",
        initial_steps: int = 2,
        final_steps: int = 150,
        time_distribution: str = "uniform",
        logit_mean: float = -1.1,
        logit_std: float = 2.0,
        penalty: str = "mse",
        penalty_c: Optional[float] = None,
        weighting: str = "uniform",
        target_ema_decay: float = 0.9,
    ):
        super().__init__(schedule, curriculum, initial_steps, final_steps, time_distribution, logit_mean,
                         logit_std, penalty, penalty_c, weighting, target_ema_decay)

    def target_decay(self, ctx: LossContext) -> float:
        """``mu(k) = exp(s_0 log mu_0 / N(k))`` under the CT curriculum, else ``mu_0``."""
        if self.curriculum == "ct":
            return ct_target_decay(self.target_ema_decay, self.initial_steps, self.num_steps(ctx))
        return self.target_ema_decay

    def previous_point(
        self,
        x0: torch.Tensor,
        eps: torch.Tensor,
        x_s: torch.Tensor,
        s: torch.Tensor,
        r: torch.Tensor,
        cond: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``x_r = alpha(r) x_0 + sigma(r) eps``: the same data and noise as ``x_s``."""
        return self.schedule.sample_xt(x0, eps, r)


@register
class ImprovedConsistencyTraining(ConsistencyTraining):
    """iCT: CT with pseudo-Huber, online target, 1/(s - r) weights, doubling steps, logit-normal times.

    Song & Dhariwal 2023, "Improved techniques for training consistency models" (arXiv
    2310.14189), in this convention:

    ``L = E (sqrt(|F(x_s, s, 0) - sg[F(x_r, r, 0)]|^2 + c^2) - c) / (s - r)``,
    ``c = 0.00054 sqrt(D)``, same ``(x_0, eps)`` for ``x_s`` and ``x_r``.

    The target is the online network under stop-gradient (the paper's EMA rate 0,
    ``target_ema_decay=0``); the number of
    intervals doubles from 10 to 1280 in equal stages; the interval is drawn from the
    discretised logit-normal ``(-1.1, 2.0)``, which for the linear schedule is iCT's log-normal
    over the EDM noise level ``sigma / alpha``. The grid is uniform in ``t`` (not Karras).
    """

    name = "ict"

    def __init__(
        self,
        schedule: Schedule,
        curriculum: str = "ict",
        initial_steps: int = 10,
        final_steps: int = 1280,
        time_distribution: str = "logit_normal",
        logit_mean: float = -1.1,
        logit_std: float = 2.0,
        penalty: str = "pseudo_huber",
        penalty_c: Optional[float] = None,
        weighting: str = "inverse_step",
        target_ema_decay: float = 0.0,
    ):
        super().__init__(schedule, curriculum, initial_steps, final_steps, time_distribution, logit_mean,
                         logit_std, penalty, penalty_c, weighting, target_ema_decay)


@register
class ConsistencyDistillation(_AnchoredConsistency):
    """Consistency distillation: ``|F(x_s, s, 0) - sg[F_ema(x_r, r, 0)]|^2``, ``x_r`` a teacher Euler/Heun step.

    Song, Dhariwal, Chen & Sutskever 2023, "Consistency models" (arXiv 2303.01469), in this
    convention:

    ``L = E |F(x_s, s, 0) - sg[F_ema(x_r, r, 0)]|^2``, ``r = s - 1/N``,
    Euler ``x_r = x_s + (r - s) v_T(x_s, s)`` or Heun (the paper's choice, the default).

    The teacher ``v_T`` is a diffusion model (``--teacher RUN_DIR`` of an ``fm`` run, or
    ``exact``); the target uses the method's own EMA weights with the paper's fixed rate
    ``target_ema_decay = 0.95`` (0: the online weights under stop-gradient). At the exact map
    the residual is the teacher step's local error, ``O(1/N^2)`` (Euler) or ``O(1/N^3)`` (Heun).
    ``N`` is fixed (``final_steps``) by default.
    """

    name = "cd"
    setting = "teacher"
    cost = 5
    needs_teacher = True

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        solver: str = "heun",
        curriculum: str = "fixed",
        initial_steps: int = 18,
        final_steps: int = 18,
        time_distribution: str = "uniform",
        logit_mean: float = -1.1,
        logit_std: float = 2.0,
        penalty: str = "mse",
        penalty_c: Optional[float] = None,
        weighting: str = "uniform",
        target_ema_decay: float = 0.95,
    ):
        _check_choice("solver", solver, SOLVERS)
        super().__init__(schedule, curriculum, initial_steps, final_steps, time_distribution, logit_mean,
                         logit_std, penalty, penalty_c, weighting, target_ema_decay)
        self.teacher = teacher
        self.solver = solver

    def previous_point(
        self,
        x0: torch.Tensor,
        eps: torch.Tensor,
        x_s: torch.Tensor,
        s: torch.Tensor,
        r: torch.Tensor,
        cond: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """One teacher ODE step from ``s`` to ``r``."""
        return teacher_step(self.teacher, x_s, s, r, cond, self.solver)


@register
class EasyConsistencyTuning(ConsistencyTraining):
    """ECT: consistency training from a pretrained diffusion model with a shrinking step ``s - r``.

    Geng, Pokle, Luo, Lin & Kolter 2024, "Consistency models made easy" (arXiv 2406.14548), in
    this convention:

    ``L = E (sqrt(|F(x_s, s, 0) - sg[F(x_r, r, 0)]|^2 + c^2) - c) / (s - r)``, same ``(x_0, eps)``,
    ``r = max(0, s (1 - n(s) / q^a))``, ``n(s) = 1 + 8 sigmoid(-sigma(s) / alpha(s))``,

    with ``a`` the stage (``stages`` equal stages over training): stage 0 has ``r = 0``, which is
    diffusion (denoiser) training, and each later stage divides the step by ``q``. The paper's
    mapping acts on the EDM noise level; here it acts on ``t`` with ``n`` evaluated at the EDM
    level ``sigma / alpha``. The target is the online network under stop-gradient
    (``target_ema_decay=0``); times are logit-normal ``(-1.1, 2.0)``. ``initialize``, which the
    trainer calls once before the first step of a fresh run (not on resume), copies the teacher's
    weights into the student (``--teacher RUN_DIR`` of a run with the same model architecture, e.g.
    an ``fm`` run); the trainer then starts its evaluation EMA from them.
    """

    name = "ect"
    initializes_from_teacher = True
    setting = "teacher"
    needs_teacher = True

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        stages: int = 6,
        q: float = 2.0,
        time_distribution: str = "logit_normal",
        logit_mean: float = -1.1,
        logit_std: float = 2.0,
        penalty: str = "pseudo_huber",
        penalty_c: Optional[float] = None,
        target_ema_decay: float = 0.0,
    ):
        if stages < 1 or q <= 1:
            raise ValueError(f"ect needs stages >= 1 and q > 1; got stages={stages}, q={q}")
        super().__init__(schedule, "fixed", 1, 1, time_distribution, logit_mean, logit_std, penalty, penalty_c,
                         "inverse_step", target_ema_decay)
        self.teacher = teacher
        self.stages, self.q = stages, q

    def stage(self, ctx: LossContext) -> int:
        """The stage ``a = floor(stages * step / total_steps)`` (at most ``stages - 1``)."""
        return min(self.stages - 1, ctx.step * self.stages // max(ctx.total_steps, 1))

    def intervals(
        self, n: int, generator: torch.Generator, x0: torch.Tensor, ctx: LossContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s`` from ``time_distribution``, ``r = max(0, s (1 - n(s) / q^stage))``."""
        s = self.times.times(n, generator, x0.device).to(x0.dtype).clamp(min=1e-4)
        alpha, sigma = self.schedule.alpha(s), self.schedule.sigma(s)
        noise_level = sigma / alpha.clamp(min=1e-12)
        shrink = (1 + 8 * torch.sigmoid(-noise_level)) / self.q ** self.stage(ctx)
        return s, (s * (1 - shrink)).clamp(min=0.0)

    def initialize(self, model: nn.Module) -> None:
        """Copy the teacher network's weights into ``model`` (ECT's initialisation of a fresh run)."""
        source = getattr(self.teacher, "model", None)
        if not isinstance(source, nn.Module):
            raise ValueError(
                "ect initialises the student from a trained run: pass --teacher RUN_DIR (an fm or flow-map run with "
                f"the same model settings); the teacher {type(self.teacher).__name__} has no network weights"
            )
        src, dst = list(source.parameters()), list(model.parameters())
        shapes_src, shapes_dst = [tuple(p.shape) for p in src], [tuple(p.shape) for p in dst]
        if shapes_src != shapes_dst:
            raise ValueError(
                "ect: the teacher run's network does not match the student's (use the same model.width, "
                f"model.depth, model.num_freqs); teacher parameter shapes {shapes_src}, student {shapes_dst}"
            )
        with torch.no_grad():
            for p, q in zip(dst, src):
                p.copy_(q)

    def curriculum_state(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        """ECT's steps have no grid: the stage ``a`` of the shrinking schedule."""
        return {"stage": torch.tensor(float(self.stage(ctx)))}


@register
class ContinuousConsistency(Method):
    """sCM: continuous-time consistency training with tangent normalisation, ``grad ~ E[g_n . dF(x_s, s, 0)/dtheta]``.

    Lu & Song 2024, "Simplifying, stabilizing and scaling continuous-time consistency models"
    (arXiv 2410.11081), sCT, in this convention. The ``r -> s`` limit of consistency training has
    the gradient of ``E <F(x_s, s, 0), sg[g]>`` with ``g = d/ds F(x_s, s, 0)`` along the path:

    ``g = u - V(x_s, s, 0) - w s (d_s V + grad_x V . u)``, ``u = alpha'(s) x_0 + sigma'(s) eps``,
    ``L = E |F(x_s, s, 0) - sg[F(x_s, s, 0) - g / (rms(g) + c)]|^2``

    (``F(x, s, 0) = x - s V(x, s, 0)``). The JVP along the tangent ``(u, 1, 0)`` uses the online
    weights under stop-gradient (the paper's ``theta^- = sg[theta]``, no EMA); ``w`` is the tangent
    warm-up, rising linearly from 0 to 1 over the first ``tangent_warmup`` fraction of training;
    ``c = tangent_norm_c`` normalises the tangent. The paper's learned adaptive weighting is not
    used. At the exact map ``E[g | x_s] = 0`` (Eulerian rule), and for Gaussian data ``g`` is
    symmetric given ``x_s``, so the normalised loss is still stationary there.
    """

    name = "scm"
    rule = "eulerian"
    setting = "scratch"
    cost = 5
    multistep_sampler = "consistency"

    def __init__(
        self,
        schedule: Schedule,
        time_distribution: str = "logit_normal",
        logit_mean: float = -1.0,
        logit_std: float = 1.4,
        tangent_norm_c: float = 0.1,
        tangent_warmup: float = 0.1,
        jvp_backend: str = "auto",
    ):
        super().__init__(schedule)
        check_backend(jvp_backend)
        if tangent_norm_c <= 0 or not 0 <= tangent_warmup <= 1:
            raise ValueError(f"need tangent_norm_c > 0 and 0 <= tangent_warmup <= 1; "
                             f"got {tangent_norm_c}, {tangent_warmup}")
        self.times = TimePairSampler(1.0, time_distribution, logit_mean=logit_mean, logit_std=logit_std)
        self.tangent_norm_c, self.tangent_warmup, self.jvp_backend = tangent_norm_c, tangent_warmup, jvp_backend

    def warmup_factor(self, ctx: LossContext) -> float:
        """The tangent warm-up ``w``: ``step / (tangent_warmup * total_steps)``, capped at 1."""
        if self.tangent_warmup == 0:
            return 1.0
        return min(1.0, ctx.step / (self.tangent_warmup * max(ctx.total_steps, 1)))

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        ctx = ctx if ctx is not None else LossContext()
        x0, cond = batch.x0, batch.cond
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        s = self.times.times(x0.shape[0], generator, x0.device).to(x0.dtype)
        x_s = self.schedule.sample_xt(x0, eps, s)
        u = self.schedule.conditional_velocity(x0, eps, s)
        v_avg, d_v = flow_jvp(model, x_s, s, torch.zeros_like(s), cond, dx=u, ds=1.0, output="V",
                              backend=self.jvp_backend, grad="primal")
        s_ = expand_like(s, x_s)
        g = u - v_avg.detach() - self.warmup_factor(ctx) * s_ * d_v
        rms = g.flatten(1).pow(2).mean(dim=1).sqrt()
        g_normalised = g / expand_like(rms + self.tangent_norm_c, g)
        f = x_s - s_ * v_avg  # F(x_s, s, 0), carrying the gradient
        loss = mean_square(f - (f.detach() - g_normalised)).mean()
        return LossOutput(loss, {"consistency": loss.detach()}, {"tangent_rms": rms.mean().detach()})


@register
class FlowAnchoredConsistency(Method):
    """FACM: a consistency loss on ``F(x_s, s, 0)`` anchored by flow matching at the expanded times ``1 + s``.

    Peng et al. 2025, "Flow-anchored consistency models" (arXiv 2507.03738), in this convention
    (their ``t`` is ``1 - s``; their expanded time ``2 - t`` is ``1 + s``). With the teacher
    velocity ``v = v_T(x_s, s)``:

    - anchor: ``|V(x_s, 1+s, 1+s) - v|^2 + (1 - cos(V(x_s, 1+s, 1+s), v))``: the network at times in
      ``[1, 2]`` is a velocity (denoiser) model, an auxiliary task that keeps the features of the
      flow;
    - consistency: ``V_tgt = v - s (d_s V + grad_x V . v)`` (from ``d/ds F(x_s, s, 0) = 0``),
      ``g = sg[V] - sg[V_tgt]``, target ``sg[V] - (1 - (1 - s)^p) clip(g, -1, 1)``, and
      ``L_CM = sin(pi s / 2) e / sg[e + c]^q``, ``e = |V(x_s, s, 0) - target|^2`` (mean over features),

    ``L = E[L_CM + anchor]``. ``V`` and its JVP along ``(v, 1, 0)`` use the online weights; the JVP
    and the target are under stop-gradient. Times are logit-normal ``(-0.8, 1.6)`` (the paper's
    log-normal noise level for the linear schedule); ``p = relaxation_power``, ``c = adaptive_c``,
    ``q = adaptive_power``. The teacher is a diffusion model (``--teacher RUN_DIR`` or ``exact``).
    """

    name = "facm"
    rule = "eulerian"
    setting = "teacher"
    cost = 8
    needs_teacher = True
    multistep_sampler = "consistency"

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        time_distribution: str = "logit_normal",
        logit_mean: float = -0.8,
        logit_std: float = 1.6,
        relaxation_power: float = 0.5,
        adaptive_c: float = 1e-3,
        adaptive_power: float = 0.5,
        jvp_backend: str = "auto",
    ):
        super().__init__(schedule)
        check_backend(jvp_backend)
        if relaxation_power <= 0 or adaptive_c <= 0 or adaptive_power < 0:
            raise ValueError(
                f"need relaxation_power > 0, adaptive_c > 0, adaptive_power >= 0; got "
                f"{relaxation_power}, {adaptive_c}, {adaptive_power}"
            )
        self.teacher = teacher
        self.times = TimePairSampler(1.0, time_distribution, logit_mean=logit_mean, logit_std=logit_std)
        self.relaxation_power, self.adaptive_c, self.adaptive_power = relaxation_power, adaptive_c, adaptive_power
        self.jvp_backend = jvp_backend

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        x0, cond = batch.x0, batch.cond
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        s = self.times.times(x0.shape[0], generator, x0.device).to(x0.dtype)
        x_s = self.schedule.sample_xt(x0, eps, s)
        with torch.no_grad():
            v = self.teacher.velocity(x_s, s, cond)

        expanded = 1 + s
        v_aux = model(x_s, expanded, expanded, cond, output="V", check_times=False)
        cosine = torch.nn.functional.cosine_similarity(v_aux.flatten(1), v.flatten(1), dim=1)
        anchor = mean_square(v_aux - v) + (1 - cosine)

        v_avg, d_v = flow_jvp(model, x_s, s, torch.zeros_like(s), cond, dx=v, ds=1.0, output="V",
                              backend=self.jvp_backend, grad="primal")
        s_ = expand_like(s, x_s)
        with torch.no_grad():
            g = v_avg - (v - s_ * d_v)
            relax = 1 - (1 - s_) ** self.relaxation_power
            target = v_avg - relax * g.clamp(-1.0, 1.0)
        e = mean_square(v_avg - target)
        consistency = adaptive_weight(e, self.adaptive_power, self.adaptive_c) * e * torch.sin(0.5 * math.pi * s)
        loss = (consistency + anchor).mean()
        terms = {"consistency": consistency.mean().detach(), "anchor": anchor.mean().detach()}
        return LossOutput(loss, terms, {"tangent_norm": d_v.detach().flatten(1).norm(dim=1).mean()})


def _through_frozen_weights(
    model: nn.Module, y: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]
) -> torch.Tensor:
    """``F(y, t, 0)`` with the weights under stop-gradient but the gradient flowing through ``y``.

    The network is called with detached copies of its parameters (``torch.func.functional_call``), so
    back-propagation reaches ``y`` (``J^T`` of the map) and nothing else: one forward and one
    input-only backward. Under ``DistributedDataParallel`` the call goes to the wrapped module: it
    produces no weight gradient, so it must not register DDP's gradient hooks either.
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    frozen = {name: p.detach() for name, p in inner.named_parameters()}
    return torch.func.functional_call(inner, frozen, (y, t, torch.zeros_like(t), cond), {"check_times": False})


@register
class ConsistencyTrajectory(_EMATargetMethod):
    """CTM: ``|F_sg(F(x_s, s, t), t, 0) - F_sg(sg[F_ema(x_r, r, t)], t, 0)|^2``, ``x_r`` a teacher step; plus diag.

    Kim et al. 2024, "Consistency trajectory model: learning probability flow ODE trajectory of
    diffusion" (arXiv 2310.02279), in this convention (``s > r >= t``):

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E |F_sg(F(x_s, s, t), t, 0) - F_sg(sg[F_ema(x_r, r, t)], t, 0)|^2``,

    with ``r = s - 1/N`` on the uniform grid, ``x_r`` one teacher Heun (or Euler) step from
    ``x_s``, ``t ~ U[0, r]``. The student is the two-time jump ``F(x_s, s, t)``; the target jumps
    from the teacher's point with the method's own EMA weights (``target_ema_decay``, 0.999 as in
    the paper's released training scripts; 0: the online weights under stop-gradient); both are
    then carried to ``t = 0`` by the map with stop-gradient weights ``F_sg`` (the online weights,
    not updated through this call, but differentiated with respect to its input on the student
    side), so the comparison happens in data space. The first term (the paper's denoising score
    matching) trains the diagonal on a ``diagonal_fraction`` of the batch. The GAN term of the
    paper is not included.
    """

    name = "ctm"
    rule = "eulerian"
    setting = "teacher"
    cost = 7
    needs_teacher = True

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        diagonal_fraction: float = 0.25,
        num_steps: int = 18,
        solver: str = "heun",
        time_distribution: str = "uniform",
        logit_mean: float = -1.1,
        logit_std: float = 2.0,
        target_ema_decay: float = 0.999,
    ):
        super().__init__(schedule, target_ema_decay)
        _check_choice("solver", solver, SOLVERS)
        if num_steps < 1:
            raise ValueError(f"num_steps must be a positive number of grid intervals; got {num_steps}")
        self.teacher = teacher
        self.pairs = TimePairSampler(diagonal_fraction, time_distribution, logit_mean=logit_mean, logit_std=logit_std)
        self.num_steps, self.solver = num_steps, solver

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        self.update_target(model, self.target_ema_decay)
        x0 = batch.x0
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        n_diag, n_off = self.pairs.split(x0.shape[0])
        diag, off = batch.take(slice(0, n_diag)), batch.take(slice(n_diag, None))
        per_example, terms = [], {}
        if n_diag > 0:
            t_diag = self.pairs.times(n_diag, generator, x0.device).to(x0.dtype)
            loss_diag = mean_square(diagonal_residual(model, self.schedule, diag.x0, eps[:n_diag], t_diag, diag.cond))
            per_example.append(loss_diag)
            terms["diagonal"] = loss_diag.mean().detach()
        if n_off > 0:
            u = self.pairs.times(n_off, generator, x0.device).to(x0.dtype)
            i = torch.ceil(u * self.num_steps).clamp(1, self.num_steps)
            s, r = i / self.num_steps, (i - 1) / self.num_steps
            t = r * torch.rand(n_off, generator=generator, device=x0.device, dtype=x0.dtype)
            x_s = self.schedule.sample_xt(off.x0, eps[n_diag:], s)
            zero = torch.zeros_like(t)
            x_r = teacher_step(self.teacher, x_s, s, r, off.cond, self.solver)
            target_jump = self.target_call(model, x_r, r, t, off.cond)
            with torch.no_grad():
                target = model(target_jump, t, zero, off.cond, check_times=False)
            jump = model(x_s, s, t, off.cond, check_times=False)
            pred = _through_frozen_weights(model, jump, t, off.cond)
            loss_ctm = mean_square(pred - target)
            per_example.append(loss_ctm)
            terms["trajectory"] = loss_ctm.mean().detach()
        return LossOutput(torch.cat(per_example).mean(), terms)
