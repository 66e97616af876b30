"""Eulerian methods: train ``d/ds F(x_s, s, t) + grad_x F(x_s, s, t) . v(x_s, s) = 0`` (spec §2).

The Eulerian residual ``R_E = d/ds F + grad_x F . v`` is one JVP of ``F`` along the tangent
``(x, s, t) <- (v, 1, 0)``. With ``F = x + (t - s) V``,

``R_E = v - V + (t - s) D``,   ``D = d/ds V + grad_x V . v`` (the JVP of ``V`` along the same tangent),

so the rule in average-velocity form is ``V = v + (t - s) D`` (MeanFlow's target) and, solved for
the velocity, ``v = V - (t - s) D`` (improved MeanFlow's reparameterisation). The velocity is
evaluated at the *current* point ``x_s``, which is what lets MeanFlow and iMF replace it by the
conditional velocity ``u = alpha'(s) x_0 + sigma'(s) eps`` (marginal-from-conditional learning,
valid with the MSE and the target linear in ``v``).

Per method (``docs/methods.md``), with ``u`` the conditional and ``v_T`` a teacher velocity:

- ``emd``: ``|d_s F + grad_x F . v_T(x_s, s)|^2``; gradient through the whole JVP.
- ``esd``: diag + ``|d_s F + sg[grad_x F . V(x_s, s, s)]|^2``; gradient through ``d_s F``.
- ``ayf-emd``: ``|V - sg[V + R_E / (|R_E| + c)]|^2`` with ``v_T``; gradient through ``V`` only.
- ``soflow``: diag + ``|V - sg[V + (F(x_s,s,t) - F(x_s + (s'-s) u, s', t)) / (s - s')]|^2``;
  gradient through ``V`` only.
- ``meanflow``: ``w |V - sg[u + (t - s) D_u]|^2``; gradient through ``V`` only.
- ``imf``: ``w |V - (t - s) sg[D_v] - u|^2`` with ``v = sg[V(x_s, s, s)]``; gradient through ``V``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from flowmaps.jvp import flow_jvp
from flowmaps.methods.base import Batch, LossContext, LossOutput
from flowmaps.methods.registry import register
from flowmaps.methods.two_time import (
    Draw, SplitBatchMethod, TwoTimeMethod, normalise_tangent, resolve_preset, semigradient,
)
from flowmaps.schedules import Schedule
from flowmaps.time_args import expand_like
from flowmaps.weighting import LossTerms, row_norm

PairParam = Union[float, Sequence[float]]


@register
class EMD(SplitBatchMethod):
    """Eulerian map distillation: ``|d_s F(x_s,s,t) + grad_x F(x_s,s,t) . v_T(x_s, s)|^2``, no stop-gradient.

    Boffi, Albergo & Vanden-Eijnden 2024, "Flow map matching" (arXiv 2406.07507), in this convention:
    ``L = E_{x_0, eps, s >= t} |d/ds F(x_s, s, t) + grad_x F(x_s, s, t) . v_T(x_s, s)|^2`` with
    ``x_s = alpha(s) x_0 + sigma(s) eps``; one JVP along ``(v_T, 1, 0)``. No stop-gradient: the
    gradient flows through the whole JVP (second-order differentiation). No EMA. The teacher is
    evaluated at the data point ``x_s``, which does not depend on the parameters.
    """

    name = "emd"
    rule = "eulerian"
    setting = "teacher"
    cost = 7
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
        super().__init__(schedule, teacher=teacher, 
            diagonal_fraction=diagonal_fraction, time_distribution=time_distribution, direction=direction,
            logit_mean=logit_mean, logit_std=logit_std, max_gap_start=max_gap_start, gap_warmup=gap_warmup,
            penalty=penalty, penalty_c=penalty_c, adaptive_p=adaptive_p, adaptive_c=adaptive_c,
            reduction=reduction, time_weight=time_weight, jvp_backend=jvp_backend)

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: Optional[LossContext]) -> None:
        with torch.no_grad():
            v = self.teacher.velocity(draw.x_s, draw.s, draw.pair.cond)
        _, residual = flow_jvp(model, draw.x_s, draw.s, draw.t, draw.pair.cond, dx=v, ds=1.0, output="F",
                               backend=self.jvp_backend, grad="full")
        terms.add("eulerian", self.weighting(residual, draw.s, draw.t))
        terms.log("residual_norm", row_norm(residual))


@register
class ESD(SplitBatchMethod):
    """Eulerian self-distillation: diag + ``|d_s F(x_s,s,t) + sg[grad_x F(x_s,s,t) . V(x_s,s,s)]|^2``.

    Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model: learning flow maps via
    self-distillation" (arXiv 2505.18825), in this convention:

    ``L = E_t |V(x_t, t, t) - (alpha' x_0 + sigma' eps)|^2
        + E_{s>=t} |d/ds F(x_s, s, t) + sg[grad_x F(x_s, s, t) . V(x_s, s, s)]|^2``.

    The velocity is the model's own diagonal (online weights, no EMA) under stop-gradient, and the
    spatial part of the JVP ``grad_x F . v`` sits under stop-gradient too, so the gradient flows only
    through the time derivative ``d/ds F`` (a JVP along ``(0, 1, 0)`` with gradient; the spatial
    part is a second JVP along ``(v, 0, 0)`` without). The batch is split by ``diagonal_fraction``.
    """

    name = "esd"
    rule = "eulerian"
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
    ):
        super().__init__(schedule, 
            diagonal_fraction=diagonal_fraction, time_distribution=time_distribution, direction=direction,
            logit_mean=logit_mean, logit_std=logit_std, max_gap_start=max_gap_start, gap_warmup=gap_warmup,
            penalty=penalty, penalty_c=penalty_c, adaptive_p=adaptive_p, adaptive_c=adaptive_c,
            reduction=reduction, time_weight=time_weight, jvp_backend=jvp_backend,
            diagonal_target=diagonal_target)

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: Optional[LossContext]) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        with torch.no_grad():
            v = model(x_s, s, s, cond, output="V", check_times=False)
        _, d_jump_ds = flow_jvp(model, x_s, s, t, cond, ds=1.0, output="F", backend=self.jvp_backend, grad="full")
        _, spatial = flow_jvp(model, x_s, s, t, cond, dx=v, output="F", backend=self.jvp_backend, grad="none")
        residual = d_jump_ds + spatial
        terms.add("eulerian", self.weighting(residual, s, t))
        terms.log("tangent_norm", row_norm(d_jump_ds))
        terms.log("residual_norm", row_norm(residual))


@register
class AYFEMD(SplitBatchMethod):
    """Align Your Flow, Eulerian: ``|V - sg[V + R_E / (|R_E| + c)]|^2`` with the teacher, JVP without gradient.

    Sabour, Fidler & Kreis 2025, "Align Your Flow: scaling continuous-time flow map distillation"
    (arXiv 2506.14603). AYF matches ``F(x_s, s, t)`` to ``sg[F(x_s', s', t)]`` where ``s'`` lies between
    ``s`` and ``t`` and ``x_s' = x_s + (s' - s) v_T(x_s, s)`` (a teacher Euler step), and lets
    ``s' -> s``. In this convention the update is ``E 2 <-g, grad_theta V(x_s, s, t)>`` with
    ``g = R_E = d/ds F + grad_x F . v_T = v_T - V + (t - s) D`` tangent-normalised to
    ``g / (|g| + c)`` (``tangent_norm_c``, 0.1 as in sCM; 0 disables), i.e. the pseudo-loss
    ``|V - sg[V + g]|^2``: with ``c = 0`` the target is MeanFlow's ``v_T + (t - s) D`` with the teacher
    velocity. AYF's loss on ``F`` weights this by ``|t - s|`` (``time_weight="gap"``). The JVP
    carries no gradient (separate gradient forward); no back-propagation into the teacher; no EMA.
    AYF's autoguidance, linearity warm-up and adversarial fine-tuning are not part of this loss.
    """

    name = "ayf-emd"
    rule = "eulerian"
    setting = "teacher"
    cost = 6
    needs_teacher = True

    def __init__(
        self,
        schedule: Schedule,
        teacher: Any,
        tangent_norm_c: float = 0.1,
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
        super().__init__(schedule, teacher=teacher, 
            diagonal_fraction=diagonal_fraction, time_distribution=time_distribution, direction=direction,
            logit_mean=logit_mean, logit_std=logit_std, max_gap_start=max_gap_start, gap_warmup=gap_warmup,
            penalty=penalty, penalty_c=penalty_c, adaptive_p=adaptive_p, adaptive_c=adaptive_c,
            reduction=reduction, time_weight=time_weight, jvp_backend=jvp_backend)
        if not tangent_norm_c >= 0:
            raise ValueError(f"tangent_norm_c of method 'ayf-emd' must be non-negative; got {tangent_norm_c}")
        self.tangent_norm_c = tangent_norm_c

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: Optional[LossContext]) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        with torch.no_grad():
            v = self.teacher.velocity(x_s, s, cond)
        avg, derivative = flow_jvp(model, x_s, s, t, cond, dx=v, ds=1.0, output="V", backend=self.jvp_backend,
                                   grad="primal")
        with torch.no_grad():
            residual = v - avg + expand_like(t - s, avg) * derivative
            step = normalise_tangent(residual, self.tangent_norm_c)
        terms.add("eulerian", self.weighting(semigradient(avg, step), s, t))
        terms.log("tangent_norm", row_norm(derivative))
        terms.log("residual_norm", row_norm(residual))


SOFLOW_VELOCITIES = ("conditional", "self")


@register
class SoFlow(SplitBatchMethod):
    """Solution flow: diag + ``|V - sg[V + R]|^2``, ``R = (F(x_s,s,t) - F(x_s + (s'-s) u, s', t)) / (s - s')``.

    Luo, Yuan & Liu 2025, "SoFlow: solution flow models for one-step generative modeling" (arXiv
    2512.15657), in this convention. The Eulerian rule as a finite difference in the source time,
    without a JVP: ``s' = s + r (t - s)`` is a point between ``s`` and ``t``, ``x_s' = x_s + (s' - s) u``
    an Euler step, and ``R = (F(x_s, s, t) - F(x_s', s', t)) / (s - s')`` tends to the Eulerian
    residual ``R_E`` as ``r -> 0``. SoFlow regresses ``F(x_s, s, t)`` on ``sg[F(x_s', s', t)]`` with a
    ``1 / (s - s')^2`` weight; its gradient is ``-2 R . grad_theta V / r`` with ``r`` the same for the
    whole batch, so we use the same direction without the ``1 / r`` scale, the pseudo-loss

    ``L = E_t |V(x_t, t, t) - u_t|^2 + E_{s>=t} w |V(x_s, s, t) - sg[V(x_s, s, t) + R]|^2``

    (its value is ``|R|^2``; the finite-difference bias of the gradient is ``O(r)``). The step fraction
    shrinks geometrically over training from ``step_start`` to ``step_end`` (the curriculum). ``u`` is
    the conditional velocity ``alpha'(s) x_0 + sigma'(s) eps`` (``velocity="conditional"``, unbiased
    only as ``r -> 0``) or the model's own diagonal ``sg[V(x_s, s, s)]`` (``"self"``). Stop-gradient on
    ``R`` (online weights, no EMA); the gradient flows through ``V(x_s, s, t)``. The step constants
    and the weighting are our choices (the paper's exact values could not be checked here): no
    adaptive weight ``w`` by default, because with the conditional velocity MeanFlow's ``p = 1``
    biases the fixed point on low-dimensional data (``docs/methods.md``).
    """

    name = "soflow"
    rule = "eulerian"
    setting = "self-distillation"
    cost = 7

    def __init__(
        self,
        schedule: Schedule,
        velocity: str = "conditional",
        step_start: float = 0.25,
        step_end: float = 0.01,
        diagonal_fraction: float = 0.75,
        time_distribution: str = "logit_normal",
        direction: str = "backward",
        logit_mean: PairParam = -0.4,
        logit_std: PairParam = 1.0,
        max_gap_start: float = 1.0,
        gap_warmup: float = 0.0,
        penalty: str = "mse",
        penalty_c: float = 1e-3,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        reduction: str = "sum",
        time_weight: str = "none",
    ):
        super().__init__(schedule, 
            diagonal_fraction=diagonal_fraction, time_distribution=time_distribution, direction=direction,
            logit_mean=logit_mean, logit_std=logit_std, max_gap_start=max_gap_start, gap_warmup=gap_warmup,
            penalty=penalty, penalty_c=penalty_c, adaptive_p=adaptive_p, adaptive_c=adaptive_c,
            reduction=reduction, time_weight=time_weight, jvp_backend="auto")
        if velocity not in SOFLOW_VELOCITIES:
            raise ValueError(f"velocity of method 'soflow' must be one of {SOFLOW_VELOCITIES}; got {velocity!r}")
        if not 0 < step_end <= step_start < 1:
            raise ValueError(f"method 'soflow' needs 0 < step_end <= step_start < 1; got {step_end}, {step_start}")
        self.velocity, self.step_start, self.step_end = velocity, step_start, step_end

    def step_fraction(self, progress: float) -> float:
        """``r(progress) = step_start (step_end / step_start)^progress``."""
        return self.step_start * (self.step_end / self.step_start) ** progress

    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: Optional[LossContext]) -> None:
        x_s, s, t, cond = draw.x_s, draw.s, draw.t, draw.pair.cond
        r = self.step_fraction(draw.progress)
        s_next = s + r * (t - s)
        with torch.no_grad():
            if self.velocity == "conditional":
                u = self.schedule.conditional_velocity(draw.pair.x0, draw.eps, s)
            else:
                u = model(x_s, s, s, cond, output="V", check_times=False)
            target = model(x_s + expand_like(s_next - s, x_s) * u, s_next, t, cond, check_times=False)
        avg = model(x_s, s, t, cond, output="V", check_times=False)
        with torch.no_grad():
            jump = x_s + expand_like(t - s, avg) * avg
            residual = (jump - target) / expand_like(s - s_next, jump)
        terms.add("eulerian", self.weighting(semigradient(avg, residual), s, t))
        terms.log("residual_norm", row_norm(residual))
        terms.log("step_fraction", torch.tensor(r))


MEANFLOW_PRESETS = {
    # MeanFlow ImageNet 256 (DiT): 25% of the rows with s != t, both times ~ sigmoid(N(-0.4, 1)), p = 1
    "imagenet": dict(diagonal_fraction=0.75, logit_mean=-0.4, logit_std=1.0, adaptive_p=1.0),
    # MeanFlow CIFAR-10 (U-Net, official PyTorch code): 75% with s != t, source ~ sigmoid(N(-0.6, 1.6)),
    # target ~ sigmoid(N(-4, 1.6)) (ordered), p = 0.75
    "cifar10": dict(diagonal_fraction=0.25, logit_mean=(-0.6, -4.0), logit_std=1.6, adaptive_p=0.75),
}


class _AllRowsEulerian(TwoTimeMethod):
    """MeanFlow-type methods: one formula on every row; the diagonal rows have ``s = t``."""

    def all_rows(self, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext]):
        """``(x_0, eps, s, t, x_s, u)`` for the whole batch, diagonal rows first (``s = t``)."""
        draw = self.draw(batch, generator, ctx)
        s = torch.cat([draw.t_diag, draw.s])
        t = torch.cat([draw.t_diag, draw.t])
        eps = torch.cat([draw.eps_diag, draw.eps])
        x_s = self.schedule.sample_xt(batch.x0, eps, s)
        return draw, s, t, x_s, self.schedule.conditional_velocity(batch.x0, eps, s)

    @staticmethod
    def log_rows(terms: LossTerms, per_example: torch.Tensor, n_diag: int, name: str) -> None:
        terms.add("diagonal", per_example[:n_diag])
        terms.add(name, per_example[n_diag:])


@register
class MeanFlow(_AllRowsEulerian):
    """MeanFlow: ``w |V(x_s,s,t) - sg[u + (t-s)(d_s V + grad_x V . u)]|^2``, ``u = alpha' x_0 + sigma' eps``.

    Geng, Deng, Bai, Kolter & He 2025, "Mean flows for one-step generative modeling" (arXiv
    2505.13447), in this convention (MeanFlow's ``u(z_t, r, t)`` with ``r < t`` is our ``V(x_s, s, t)``
    with ``s`` = their ``t`` and ``t`` = their ``r``):

    ``L = E w |V(x_s, s, t) - sg[u + (t - s) (d/ds V + grad_x V . u)]|^2``,   ``w = sg[1 / (|.|^2 + c)^p]``,

    the average-velocity Eulerian rule with the conditional velocity in place of the marginal one
    (valid because of the MSE, the evaluation at ``x_s``, the target linear in ``u`` and the
    stop-gradient on the whole target). One JVP along ``(u, 1, 0)`` without gradient and a separate
    gradient forward of ``V``; no EMA in the loss. Rows with ``s = t`` reduce to flow matching.
    ``preset``: ``"imagenet"`` (the paper's ImageNet recipe, default) or ``"cifar10"``; options left
    at ``None`` come from it. ``|.|^2`` is the squared L2 norm (``reduction="sum"``, as the paper).
    With ``p > 0`` the update is unbiased only for symmetric conditional residuals (``flowmaps.weighting``).
    """

    name = "meanflow"
    rule = "eulerian"
    setting = "scratch"
    cost = 4

    def __init__(
        self,
        schedule: Schedule,
        preset: str = "imagenet",
        diagonal_fraction: Optional[float] = None,
        time_distribution: str = "logit_normal",
        direction: str = "backward",
        logit_mean: Optional[PairParam] = None,
        logit_std: Optional[PairParam] = None,
        max_gap_start: float = 1.0,
        gap_warmup: float = 0.0,
        penalty: str = "mse",
        penalty_c: float = 1e-3,
        adaptive_p: Optional[float] = None,
        adaptive_c: float = 1e-3,
        reduction: str = "sum",
        time_weight: str = "none",
        jvp_backend: str = "auto",
    ):
        chosen = resolve_preset(MEANFLOW_PRESETS, preset, "meanflow", diagonal_fraction=diagonal_fraction,
                                logit_mean=logit_mean, logit_std=logit_std, adaptive_p=adaptive_p)
        super().__init__(schedule, 
            time_distribution=time_distribution, direction=direction, max_gap_start=max_gap_start,
            gap_warmup=gap_warmup, penalty=penalty, penalty_c=penalty_c, adaptive_c=adaptive_c,
            reduction=reduction, time_weight=time_weight, jvp_backend=jvp_backend, **chosen)
        self.preset = preset

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        draw, s, t, x_s, u = self.all_rows(batch, generator, ctx)
        avg, derivative = flow_jvp(model, x_s, s, t, batch.cond, dx=u, ds=1.0, output="V",
                                   backend=self.jvp_backend, grad="primal")
        target = u + expand_like(t - s, u) * derivative
        terms = LossTerms(draw.size)
        self.log_rows(terms, self.weighting(avg - target, s, t), draw.t_diag.shape[0], "meanflow")
        terms.log("tangent_norm", row_norm(derivative))
        terms.log("residual_norm", row_norm(avg - target))
        return LossOutput(*terms.result())


@register
class ImprovedMeanFlow(_AllRowsEulerian):
    """Improved MeanFlow: ``w |V(x_s,s,t) - (t-s) sg[d_s V + grad_x V . V(x_s,s,s)] - u|^2``.

    Geng et al. 2025, "Improved mean flows: on the challenges of fastforward generative models"
    (arXiv 2512.02012), in this convention. The Eulerian rule solved for the velocity,
    ``v(x_s, s) = V - (t - s) (d/ds V + grad_x V . v)``, turns the flow map into a reparameterised
    velocity predictor ``W = V(x_s, s, t) - (t - s) sg[D]`` trained by plain flow matching against
    ``u = alpha'(s) x_0 + sigma'(s) eps``; the JVP tangent uses the model's own velocity
    ``v = sg[V(x_s, s, s)]`` (online weights; iMF uses an auxiliary velocity head of the same
    network). Stop-gradient on the JVP term (it avoids second-order differentiation; the method
    would be valid without it); the gradient flows through ``V(x_s, s, t)``. No EMA in the loss.
    Paper defaults: half the rows on the diagonal, both times ``~ sigmoid(N(-0.4, 1))``, adaptive
    weight ``p = 1``, ``c = 0.01`` on the squared L2 norm.
    """

    name = "imf"
    rule = "eulerian"
    setting = "scratch"
    cost = 5

    def __init__(
        self,
        schedule: Schedule,
        diagonal_fraction: float = 0.5,
        time_distribution: str = "logit_normal",
        direction: str = "backward",
        logit_mean: PairParam = -0.4,
        logit_std: PairParam = 1.0,
        max_gap_start: float = 1.0,
        gap_warmup: float = 0.0,
        penalty: str = "mse",
        penalty_c: float = 1e-3,
        adaptive_p: float = 1.0,
        adaptive_c: float = 0.01,
        reduction: str = "sum",
        time_weight: str = "none",
        jvp_backend: str = "auto",
    ):
        super().__init__(schedule, 
            diagonal_fraction=diagonal_fraction, time_distribution=time_distribution, direction=direction,
            logit_mean=logit_mean, logit_std=logit_std, max_gap_start=max_gap_start, gap_warmup=gap_warmup,
            penalty=penalty, penalty_c=penalty_c, adaptive_p=adaptive_p, adaptive_c=adaptive_c,
            reduction=reduction, time_weight=time_weight, jvp_backend=jvp_backend)

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        draw, s, t, x_s, u = self.all_rows(batch, generator, ctx)
        with torch.no_grad():
            v = model(x_s, s, s, batch.cond, output="V", check_times=False)
        avg, derivative = flow_jvp(model, x_s, s, t, batch.cond, dx=v, ds=1.0, output="V",
                                   backend=self.jvp_backend, grad="primal")
        velocity = avg - expand_like(t - s, avg) * derivative
        terms = LossTerms(draw.size)
        self.log_rows(terms, self.weighting(velocity - u, s, t), draw.t_diag.shape[0], "imf")
        terms.log("tangent_norm", row_norm(derivative))
        terms.log("residual_norm", row_norm(velocity - u))
        return LossOutput(*terms.result())
