"""Lagrangian methods: train ``d/dt F(x_s, s, t) = v(F(x_s, s, t), t)`` (spec §2).

The Lagrangian residual is ``R_L = d/dt F(x_s, s, t) - v(F(x_s, s, t), t)``. With
``F = x + (t - s) V`` its time derivative is ``d/dt F = V + (t - s) d/dt V``, which one forward-mode
JVP along the tangent ``(x, s, t) <- (0, 0, 1)`` returns together with ``F``. In average-velocity
form the rule reads ``V(x_s, s, t) = v(F(x_s, s, t), t) - (t - s) d/dt V(x_s, s, t)``.

The methods differ in where ``v`` comes from (a teacher ``v_T``; the model's own diagonal, online or
EMA weights) and which parts sit under stop-gradient ``sg[.]`` (``docs/methods.md``):

- ``lmd``: ``|d_t F - v_T(F, t)|^2``; gradient through ``d_t F`` and ``F``.
- ``lsd``: diag + ``|d_t F - sg[V(F, t, t)]|^2``; gradient through ``d_t F``.
- ``ayf-lmd``: ``|V - sg[V - R_L]|^2`` with ``R_L`` from the teacher; gradient through ``V`` only.
- ``tvm``: diag + ``|d_t F - V_ema(sg[F], t, t)|^2``; gradient through ``d_t F``.
- ``pid``: ``s = 1``, ``|(F(eps,1,t+h) - F(eps,1,t))/h - sg[v_T(F(eps,1,t), t)]|^2``; gradient
  through both finite-difference evaluations.
- ``freeflow``: ``s = 1``, ``|V - sg[v_T(F, t) - (t - 1) d_t V]|^2`` + an auxiliary-denoiser
  correction; gradient through ``V`` and the one-step samples ``F(eps, 1, 0)``.

A sign check that every test relies on: for the exact flow map, ``R_L = 0``; for ``F = x - (t - s) V``
(the sign-flipped map) ``R_L = -2 v`` and every loss here is large.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from flowmaps.flow_map import FlowMap
from flowmaps.jvp import check_backend, flow_jvp
from flowmaps.methods.base import Batch, EMATargetState, LossContext, LossOutput, Method
from flowmaps.methods.diagonal import diagonal_residual
from flowmaps.methods.grid_distillation import GridDistillation
from flowmaps.methods.registry import register
from flowmaps.methods.two_time import (
    Draw, SplitBatchMethod, TwoTimeMethod, normalise_tangent, progress, semigradient,
)
from flowmaps.nets import MLP
from flowmaps.schedules import Schedule
from flowmaps.time_pairs import TimePairSampler
from flowmaps.weighting import LossTerms, LossWeighting, row_norm, squared_norm

PairParam = Union[float, Sequence[float]]


def _lagrangian_jvp(method: TwoTimeMethod, model: nn.Module, draw: Draw, grad: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F(x_s, s, t), d/dt F(x_s, s, t))`` on the pair rows."""
    return flow_jvp(model, draw.x_s, draw.s, draw.t, draw.pair.cond, dt=1.0, output="F",
                    backend=method.jvp_backend, grad=grad)


@register
class LMD(SplitBatchMethod):
    """Lagrangian map distillation: ``|d_t F(x_s,s,t) - v_T(F(x_s,s,t), t)|^2``, no stop-gradient.

    Boffi, Albergo & Vanden-Eijnden 2024, "Flow map matching" (arXiv 2406.07507), in this convention:

    ``L = E_{x_0, eps, s >= t} |d/dt F(x_s, s, t) - v_T(F(x_s, s, t), t)|^2``,
    ``x_s = alpha(s) x_0 + sigma(s) eps``.

    No stop-gradient: the gradient flows through the JVP tangent ``d/dt F`` (second-order
    differentiation) and through the jump ``F`` into the frozen teacher's input. No EMA.
    ``diagonal_fraction`` rows (0 by default) regress ``V(x_t, t, t)`` on ``v_T(x_t, t)``.
    """

    name = "lmd"
    rule = "lagrangian"
    setting = "teacher"
    cost = 9
    needs_teacher = True

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        diagonal_fraction: float = 0.0,
        time_distribution: str = "uniform",
        direction: str = "backward",
        logit_mean: PairParam = -0.4,
        logit_std: PairParam = 1.0,
        max_gap_start: float = 1.0,
        gap_warmup: float = 0.0,
        penalty: str = "mse",
        penalty_c: float = 1e-3,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        reduction: str = "mean",
        time_weight: str = "none",
        jvp_backend: str = "auto",
    ):
        super().__init__(
            schedule, teacher=teacher, diagonal_fraction=diagonal_fraction, time_distribution=time_distribution,
            direction=direction, logit_mean=logit_mean, logit_std=logit_std, max_gap_start=max_gap_start,
            gap_warmup=gap_warmup, penalty=penalty, penalty_c=penalty_c, adaptive_p=adaptive_p,
            adaptive_c=adaptive_c, reduction=reduction, time_weight=time_weight, jvp_backend=jvp_backend,
        )

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: Optional[LossContext]) -> None:
        jump, d_jump_dt = _lagrangian_jvp(self, model, draw, grad="full")
        residual = d_jump_dt - self.teacher.velocity(jump, draw.t, draw.pair.cond)
        terms.add("lagrangian", self.weighting(residual, draw.s, draw.t))
        terms.log("tangent_norm", row_norm(d_jump_dt))
        terms.log("residual_norm", row_norm(residual))


@register
class LSD(SplitBatchMethod):
    """Lagrangian self-distillation: diag + ``|d_t F(x_s,s,t) - sg[V(F(x_s,s,t), t, t)]|^2``.

    Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model: learning flow maps via
    self-distillation" (arXiv 2505.18825), in this project's convention (t = 0 data):

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{s>=t} |d/dt F(x_s, s, t) - sg[V(F(x_s, s, t), t, t)]|^2``.

    The batch is split between the two terms by ``diagonal_fraction``. The target velocity is the
    model's own diagonal evaluated at the (detached) jump ``F(x_s, s, t)`` under stop-gradient, with
    the online weights (no EMA); the derivative term ``d/dt F`` carries the gradient (through the JVP).
    """

    name = "lsd"
    rule = "lagrangian"
    setting = "self-distillation"
    cost = 10

    def __init__(
        self,
        schedule: Schedule,
        diagonal_fraction: float = 0.75,
        time_distribution: str = "uniform",
        direction: str = "backward",
        logit_mean: PairParam = -0.4,
        logit_std: PairParam = 1.0,
        max_gap_start: float = 1.0,
        gap_warmup: float = 0.0,
        penalty: str = "mse",
        penalty_c: float = 1e-3,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        reduction: str = "mean",
        time_weight: str = "none",
        jvp_backend: str = "auto",
        diagonal_target: str = "conditional",
        grid_fraction: float = 0.0,
        grid_substeps: int = 8,
        grid_levels: int = 4,
        grid_start: float = 0.0,
        grid_target: str = "ema",
        grid_weight: float = 1.0,
        grid_rho: float = 1.0,
        grid_level_weights: Optional[Sequence[float]] = None,
    ):
        super().__init__(
            schedule, diagonal_fraction=diagonal_fraction, time_distribution=time_distribution,
            direction=direction, logit_mean=logit_mean, logit_std=logit_std, max_gap_start=max_gap_start,
            gap_warmup=gap_warmup, penalty=penalty, penalty_c=penalty_c, adaptive_p=adaptive_p,
            adaptive_c=adaptive_c, reduction=reduction, time_weight=time_weight, jvp_backend=jvp_backend,
            diagonal_target=diagonal_target,
        )
        self.grid = GridDistillation(schedule, self.name, grid_fraction, grid_substeps, grid_levels, grid_start,
                                     grid_target, grid_weight, grid_rho, grid_level_weights, reduction)

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: Optional[LossContext]) -> None:
        jump, d_jump_dt = _lagrangian_jvp(self, model, draw, grad="full")
        with torch.no_grad():
            target = model(jump.detach(), draw.t, draw.t, draw.pair.cond, output="V", check_times=False)
        residual = d_jump_dt - target
        terms.add("lagrangian", self.weighting(residual, draw.s, draw.t))
        terms.log("tangent_norm", row_norm(d_jump_dt))
        terms.log("residual_norm", row_norm(residual))

    def extra_loss(self, model: nn.Module, draw: Draw, generator: torch.Generator, terms: LossTerms,
                   ctx: Optional[LossContext]) -> None:
        self.grid.add(model, draw.batch, generator, draw.progress, ctx, terms)


@register
class AYFLMD(SplitBatchMethod):
    """Align Your Flow, Lagrangian: LMD with the whole residual under stop-gradient (``|V - sg[V - R_L]|^2``).

    Sabour, Fidler & Kreis 2025, "Align Your Flow: scaling continuous-time flow map distillation"
    (arXiv 2506.14603). AYF compares a jump ``s -> t`` with a slightly shorter jump ``s -> t'`` (``t'``
    between ``s`` and ``t``) finished by a teacher Euler step, puts that target under stop-gradient and
    lets ``t' -> t``. In this convention the resulting update is

    ``grad = E 2 <g, grad_theta V(x_s, s, t)>``, ``g = R_L = d/dt F(x_s, s, t) - v_T(F(x_s, s, t), t)``,

    i.e. the pseudo-loss ``|V - sg[V - g]|^2``: ``V`` moves towards ``v_T(F, t) - (t - s) d/dt V``
    (the average-velocity Lagrangian rule with its whole right-hand side under ``sg``). AYF's loss on
    ``F`` weights this by ``|t - s|`` (``time_weight="gap"``). The JVP carries no gradient (computed
    without grad; the gradient comes from a separate forward of ``V``), and there is no
    back-propagation through the teacher. ``tangent_norm_c > 0`` normalises ``g`` to
    ``g / (|g| + c)`` as in sCM (off by default for the Lagrangian variant). No EMA.
    """

    name = "ayf-lmd"
    rule = "lagrangian"
    setting = "teacher"
    cost = 6
    needs_teacher = True

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        tangent_norm_c: float = 0.0,
        diagonal_fraction: float = 0.0,
        time_distribution: str = "uniform",
        direction: str = "backward",
        logit_mean: PairParam = -0.4,
        logit_std: PairParam = 1.0,
        max_gap_start: float = 1.0,
        gap_warmup: float = 0.0,
        penalty: str = "mse",
        penalty_c: float = 1e-3,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        reduction: str = "mean",
        time_weight: str = "none",
        jvp_backend: str = "auto",
    ):
        super().__init__(
            schedule, teacher=teacher, diagonal_fraction=diagonal_fraction, time_distribution=time_distribution,
            direction=direction, logit_mean=logit_mean, logit_std=logit_std, max_gap_start=max_gap_start,
            gap_warmup=gap_warmup, penalty=penalty, penalty_c=penalty_c, adaptive_p=adaptive_p,
            adaptive_c=adaptive_c, reduction=reduction, time_weight=time_weight, jvp_backend=jvp_backend,
        )
        if not tangent_norm_c >= 0:
            raise ValueError(f"tangent_norm_c of method 'ayf-lmd' must be non-negative; got {tangent_norm_c}")
        self.tangent_norm_c = tangent_norm_c

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: Optional[LossContext]) -> None:
        s, t, cond = draw.s, draw.t, draw.pair.cond
        avg, d_avg_dt = flow_jvp(model, draw.x_s, s, t, cond, dt=1.0, output="V", backend=self.jvp_backend,
                                 grad="primal")
        with torch.no_grad():
            gap = (t - s).reshape(-1, *([1] * (avg.dim() - 1)))
            jump = draw.x_s + gap * avg
            d_jump_dt = avg + gap * d_avg_dt
            residual = d_jump_dt - self.teacher.velocity(jump, t, cond)
            step = -normalise_tangent(residual, self.tangent_norm_c)
        terms.add("lagrangian", self.weighting(semigradient(avg, step), s, t))
        terms.log("tangent_norm", row_norm(d_jump_dt))
        terms.log("residual_norm", row_norm(residual))


@register
class TVM(EMATargetState, TwoTimeMethod):
    """Terminal velocity matching: ``|V(x_t,t,t) - u|^2 + |d_t F(x_s,s,t) - V_ema(sg[F(x_s,s,t)], t, t)|^2``.

    Zhou, Parger, Haque & Song 2025, "Terminal velocity matching" (arXiv 2511.19797; code
    lumalabs/tvm), in this convention. Every example carries both terms:

    ``L = E |d/dt F(x_s, s, t) - V_ema(sg[F(x_s, s, t)], t, t)|^2 + E |V(x_t', t', t') - (alpha' x_0 + sigma' eps)|^2``

    with ``x_t'`` built from the same ``x_0, eps`` at an independent time ``t'``. The terminal velocity
    target uses EMA weights (decay ``target_ema_decay``, 0.99 in the paper, kept by the method itself
    and separate from the evaluation EMA; 0 uses the online weights) evaluated at the jump under
    stop-gradient; the derivative ``d/dt F`` is *not* under stop-gradient, so training differentiates
    through the JVP (TVM's custom attention kernel exists for that reason). Times follow the paper:
    gap ``s - t ~ sigmoid(N(-0.8, 1))``, target ``t ~ sigmoid(N(-0.4, 1))`` truncated to
    ``t <= 1 - gap``, ``t' ~ sigmoid(N(-0.4, 1))``. The paper's CFG scaling and semi-Lipschitz network
    changes are outside this library's scope.
    """

    name = "tvm"
    rule = "lagrangian"
    setting = "self-distillation"
    cost = 10

    def __init__(
        self,
        schedule: Schedule,
        target_ema_decay: float = 0.99,
        time_distribution: str = "gap_logit_normal",
        direction: str = "backward",
        logit_mean: PairParam = -0.4,
        logit_std: PairParam = 1.0,
        gap_logit_mean: float = -0.8,
        gap_logit_std: float = 1.0,
        max_gap_start: float = 1.0,
        gap_warmup: float = 0.0,
        penalty: str = "mse",
        penalty_c: float = 1e-3,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        reduction: str = "mean",
        time_weight: str = "none",
        jvp_backend: str = "auto",
    ):
        super().__init__(
            schedule, diagonal_fraction=0.0, time_distribution=time_distribution, direction=direction,
            logit_mean=logit_mean, logit_std=logit_std, gap_logit_mean=gap_logit_mean, gap_logit_std=gap_logit_std,
            max_gap_start=max_gap_start, gap_warmup=gap_warmup, penalty=penalty, penalty_c=penalty_c,
            adaptive_p=adaptive_p, adaptive_c=adaptive_c, reduction=reduction, time_weight=time_weight,
            jvp_backend=jvp_backend,
        )
        self.init_target(target_ema_decay)

    def terminal_loss(self, model: nn.Module, draw: Draw, terms: LossTerms) -> None:
        """``|d/dt F(x_s, s, t) - V_target(sg[F], t, t)|^2`` on every row."""
        jump, d_jump_dt = _lagrangian_jvp(self, model, draw, grad="full")
        jump, t, cond = jump.detach(), draw.t, draw.pair.cond
        if self.target is None:
            with torch.no_grad():
                target = model(jump, t, t, cond, output="V", check_times=False)
        else:
            target = self.target(model, jump, t, t, cond)
        residual = d_jump_dt - target
        terms.add("terminal", self.weighting(residual, draw.s, t))
        terms.log("tangent_norm", row_norm(d_jump_dt))
        terms.log("residual_norm", row_norm(residual))

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        if self.target is not None:
            self.target.update(model)
        draw = self.draw(batch, generator, ctx)
        terms = LossTerms(draw.size)
        self.terminal_loss(model, draw, terms)
        # the flow-matching term on every row, at an independent time t' and the same (x_0, eps)
        t_fm = self.pairs.times(draw.size, generator, batch.x0.device).to(batch.x0.dtype)
        residual = diagonal_residual(model, self.schedule, batch.x0, draw.eps, t_fm, batch.cond)
        terms.add("diagonal", squared_norm(residual, self.weighting.reduction))
        return LossOutput(*terms.result())


def _distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class _SourceOneMethod(Method):
    """Data-free teacher distillation from pure noise at ``s = 1`` (PID, FreeFlow): shared options.

    Only ``F(eps, 1, t)`` is trained, so the map is a one-step sampler (``multistep_sampler``).
    """

    needs_teacher = True
    multistep_sampler = "one_step"

    def __init__(self, schedule: Schedule, teacher: Any, time_distribution: str, logit_mean: float,
                 logit_std: float, weighting: LossWeighting):
        super().__init__(schedule)
        self.teacher = teacher
        self.times = TimePairSampler(1.0, time_distribution, logit_mean=logit_mean, logit_std=logit_std)
        self.weighting = weighting

    def noise_and_times(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``eps ~ N(0, I)`` shaped like the batch, ``s = 1`` and target times ``t``. The data is unused."""
        x0 = batch.x0
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.times.times(x0.shape[0], generator, x0.device).to(x0.dtype)
        return eps, torch.ones_like(t), t


@register
class PID(_SourceOneMethod):
    """Physics-informed distillation, data-free: ``|(F(eps,1,t+h) - F(eps,1,t))/h - sg[v_T(F(eps,1,t), t)]|^2``.

    Tee et al. 2024, "Physics informed distillation for diffusion models" (TMLR; arXiv 2411.08378),
    in this convention. The student is trained from pure noise ``eps`` at ``s = 1`` only, as a
    physics-informed network for the probability-flow ODE: the time derivative of its trajectory
    ``t -> F(eps, 1, t)`` is a forward finite difference with step ``fd_step`` (``t`` drawn in
    ``[0, 1 - h]``) and must equal the teacher velocity at the trajectory point. Stop-gradient on the
    teacher velocity only (its input ``F(eps, 1, t)`` is detached too, so the student cannot exploit
    the teacher); the gradient flows through both finite-difference evaluations. No EMA, no data.
    The paper's LPIPS distance is replaced by the penalties of ``flowmaps.weighting``. Residual at
    the exact map: ``O(h)`` (finite-difference error).
    """

    name = "pid"
    rule = "lagrangian"
    setting = "teacher"
    cost = 7

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        fd_step: float = 1e-3,
        time_distribution: str = "uniform",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
        penalty: str = "mse",
        penalty_c: float = 1e-3,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        reduction: str = "mean",
    ):
        if not 0 < fd_step < 1:
            raise ValueError(f"fd_step of method 'pid' must lie in (0, 1); got {fd_step}")
        super().__init__(schedule, teacher, time_distribution, logit_mean, logit_std,
                         LossWeighting(penalty, penalty_c, adaptive_p, adaptive_c, reduction))
        self.fd_step = fd_step

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        eps, one, t = self.noise_and_times(batch, generator)
        t = t * (1 - self.fd_step)  # keep t + h inside [0, 1]
        jump = model(eps, one, t, batch.cond, check_times=False)
        ahead = model(eps, one, t + self.fd_step, batch.cond, check_times=False)
        d_jump_dt = (ahead - jump) / self.fd_step
        with torch.no_grad():
            target = self.teacher.velocity(jump.detach(), t, batch.cond)
        residual = d_jump_dt - target
        terms = LossTerms(eps.shape[0])
        terms.add("lagrangian", self.weighting(residual))
        terms.log("tangent_norm", row_norm(d_jump_dt))
        terms.log("residual_norm", row_norm(residual))
        return LossOutput(*terms.result())


@register
class FreeFlow(_SourceOneMethod):
    """FreeFlow, data-free: ``|V(eps,1,t) - sg[v_T(F(eps,1,t), t) - (t-1) d_t V]|^2`` + auxiliary-denoiser correction.

    Tong, Ma, Xie & Jaakkola 2025, "Flow map distillation without data" (arXiv 2511.19428), in this
    convention. Two terms, both from pure noise at ``s = 1``:

    - prediction: the average-velocity Lagrangian rule with its whole right-hand side under
      stop-gradient, ``|V(eps, 1, t) - sg[v_T(F(eps, 1, t), t) - (t - 1) d/dt V(eps, 1, t)]|^2``; the
      derivative comes from the JVP engine without gradient (``jvp_backend``, by default ``auto``: the
      exact closed-form tangent where the backbone has one; the paper's finite difference is
      ``finite_difference``, float64 central, and costs two more forward passes);
    - correction: an auxiliary flow-matching network ``v_aux`` (its own Adam optimiser, ``aux_steps``
      updates per iteration, its gradients averaged over processes under ``torchrun``) learns the
      velocity of the student's one-step samples
      ``x_hat = F(eps', 1, 0)`` re-noised to ``x_tau = alpha x_hat + sigma xi``. The student then moves
      ``x_hat`` along ``g = alpha_tau^2 (v_aux - v_T)(x_tau, tau) / (alpha sigma' - sigma alpha')``, the
      noise-prediction difference (a distribution-matching / variational-score-distillation step):
      pseudo-loss ``correction_weight * |x_hat - sg[x_hat + g]|^2``, switched on after the
      ``correction_warmup`` fraction of training (the auxiliary network trains from the start).

    Stop-gradients: the prediction target and ``g`` entirely; gradients flow through ``V(eps, 1, t)``
    and ``F(eps', 1, 0)``. No EMA, no data. The auxiliary network (an MLP) is built at the first call
    on the batch's device; it and its optimiser are training state (``state_dict``, saved in
    checkpoints, not in the final run directory). Our choices where the paper could
    not be checked here: ``tau ~ U[0.02, 0.98]``, the weight of ``g``, the auxiliary network's size.
    """

    name = "freeflow"
    rule = "lagrangian"
    setting = "teacher"
    cost = 12

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        correction_weight: float = 1.0,
        correction_warmup: float = 0.1,
        aux_width: int = 128,
        aux_depth: int = 3,
        aux_lr: float = 1e-3,
        aux_steps: int = 1,
        time_distribution: str = "uniform",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
        penalty: str = "mse",
        penalty_c: float = 1e-3,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        reduction: str = "mean",
        jvp_backend: str = "auto",
    ):
        check_backend(jvp_backend, "jvp_backend of method 'freeflow'")
        if not correction_weight >= 0:
            raise ValueError(f"correction_weight of method 'freeflow' must be non-negative; got {correction_weight}")
        if not 0 <= correction_warmup <= 1:
            raise ValueError(f"correction_warmup of method 'freeflow' must lie in [0, 1]; got {correction_warmup}")
        if aux_width < 1 or aux_depth < 1 or aux_steps < 0 or not aux_lr > 0:
            raise ValueError("method 'freeflow' needs aux_width, aux_depth >= 1, aux_steps >= 0 and aux_lr > 0; "
                             f"got {aux_width}, {aux_depth}, {aux_steps}, {aux_lr}")
        super().__init__(schedule, teacher, time_distribution, logit_mean, logit_std,
                         LossWeighting(penalty, penalty_c, adaptive_p, adaptive_c, reduction))
        self.correction_weight, self.correction_warmup = correction_weight, correction_warmup
        self.aux_width, self.aux_depth, self.aux_lr, self.aux_steps = aux_width, aux_depth, aux_lr, aux_steps
        self.jvp_backend = jvp_backend
        self.auxiliary: Optional[nn.Module] = None
        self.aux_optimizer: Optional[torch.optim.Optimizer] = None
        self._pending_state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        """The auxiliary network and its optimiser (training state, saved in checkpoints)."""
        state: dict[str, Any] = {}
        if self.auxiliary is not None:
            state["auxiliary"] = {k: v.detach().cpu().clone() for k, v in self.auxiliary.state_dict().items()}
        if self.aux_optimizer is not None:
            state["aux_optimizer"] = self.aux_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the auxiliary network (built at the next loss call, on the batch's device)."""
        unknown = sorted(set(state) - {"auxiliary", "aux_optimizer"})
        if unknown:
            raise ValueError(f"method 'freeflow' cannot restore state {unknown}")
        self.auxiliary, self.aux_optimizer, self._pending_state = None, None, dict(state)

    def _auxiliary(self, x: torch.Tensor) -> nn.Module:
        if self.auxiliary is None:
            self.auxiliary = FlowMap(MLP(x[0].numel(), self.aux_width, self.aux_depth)).to(x.device, x.dtype)
            if "auxiliary" in self._pending_state:
                self.auxiliary.load_state_dict(self._pending_state["auxiliary"])
            if _distributed():  # one auxiliary network for all ranks: rank 0's weights
                for param in self.auxiliary.parameters():
                    torch.distributed.broadcast(param.data, src=0)
        if self.aux_optimizer is None and self.aux_steps > 0:
            self.aux_optimizer = torch.optim.Adam(self.auxiliary.parameters(), lr=self.aux_lr)
            if "aux_optimizer" in self._pending_state:
                self.aux_optimizer.load_state_dict(self._pending_state["aux_optimizer"])
        self._pending_state = {}
        return self.auxiliary

    def _train_auxiliary(self, aux: nn.Module, samples: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``aux_steps`` flow-matching updates of the auxiliary network on the student's samples."""
        last = samples.new_zeros(())
        for _ in range(self.aux_steps):
            xi = torch.randn(samples.shape, generator=generator, device=samples.device, dtype=samples.dtype)
            tau = torch.rand(samples.shape[0], generator=generator, device=samples.device, dtype=samples.dtype)
            with torch.enable_grad():
                loss = squared_norm(diagonal_residual(aux, self.schedule, samples, xi, tau)).mean()
                self.aux_optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if _distributed():  # DDP does not see this network: average its gradients over the ranks
                for param in aux.parameters():
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= torch.distributed.get_world_size()
            self.aux_optimizer.step()
            last = loss.detach()
        return last

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        if batch.cond is not None:
            raise ValueError("method 'freeflow' supports unconditional data only (its auxiliary network takes no condition)")
        eps, one, t = self.noise_and_times(batch, generator)
        terms = LossTerms(eps.shape[0])
        # prediction: V(eps, 1, t) -> sg[v_T(F(eps, 1, t), t) - (t - 1) d/dt V]
        avg, d_avg_dt = flow_jvp(model, eps, one, t, dt=1.0, output="V", backend=self.jvp_backend, grad="primal")
        with torch.no_grad():
            gap = (t - 1).reshape(-1, *([1] * (avg.dim() - 1)))
            target = self.teacher.velocity(eps + gap * avg, t) - gap * d_avg_dt
        terms.add("prediction", self.weighting(avg - target))
        terms.log("tangent_norm", row_norm(d_avg_dt))
        # correction: move one-step samples along the auxiliary-minus-teacher noise prediction
        noise = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
        samples = model(noise, one, torch.zeros_like(one), check_times=False)
        aux = self._auxiliary(samples)
        if self.aux_steps > 0:
            terms.log("aux_loss", self._train_auxiliary(aux, samples.detach(), generator))
        if self.correction_weight > 0 and progress(ctx) >= self.correction_warmup:
            xi = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
            tau = 0.02 + 0.96 * torch.rand(eps.shape[0], generator=generator, device=eps.device, dtype=eps.dtype)
            x_tau = self.schedule.sample_xt(samples.detach(), xi, tau)
            with torch.no_grad():
                tt = tau.reshape(-1, *([1] * (eps.dim() - 1)))
                a, s_, da, ds_ = (f(tt) for f in (self.schedule.alpha, self.schedule.sigma,
                                                  self.schedule.d_alpha, self.schedule.d_sigma))
                difference = aux(x_tau, tau, tau, output="V", check_times=False) - self.teacher.velocity(x_tau, tau)
                step = a**2 * difference / (a * ds_ - s_ * da)
            correction = squared_norm(semigradient(samples, step), self.weighting.reduction)
            terms.add("correction", self.correction_weight * correction)
            terms.log("correction_norm", row_norm(step))
        return LossOutput(*terms.result())
