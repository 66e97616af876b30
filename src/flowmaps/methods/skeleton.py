"""The one loss skeleton every method runs: draw -> diagonal term + rule term + auxiliary terms.

``SkeletonMethod.loss`` is the same for all 26 methods:

1. ``target.update``: the stop-gradient target network moves (method EMA; ``flowmaps.methods.targets``);
2. ``draw``: noise ``eps`` for the whole batch, then the split (spec §3): the first
   ``round(diagonal_fraction * B)`` rows get one time ``t`` (the diagonal), the rest a pair ``(s, t)``
   from ``pair_times`` (by default the ``TimePairSampler`` of the options; consistency methods draw
   grid cells, data-free methods ``s = 1``) and the source points ``x_s = alpha(s) x_0 + sigma(s) eps``;
3. the diagonal term ``|V(x_t, t, t) - target|^2`` on the diagonal rows, with the target of
   ``diagonal_target`` (the conditional velocity, the batch's empirical velocity, or the teacher's),
   guided at each row's scale when the condition carries one (``guided_velocity``, which the
   methods whose rule uses the conditional velocity ``u`` call too);
4. ``pair_loss``: the method's own rule on the pair rows, each residual turned into per-example
   losses by the options' ``LossWeighting`` (penalty, adaptive weight, time weight);
5. every auxiliary term (grid distillation when ``grid_fraction > 0``; later guidance and reward
   terms), each on rows of its own;
6. ``LossTerms`` sums the per-example losses over the batch into ``LossOutput``.

A method implements ``pair_loss`` (and, where it differs, ``pair_times``). ``joint_rows = True`` runs
``pair_loss`` on every row, the diagonal rows with ``s = t`` (MeanFlow-type methods, whose one
formula reduces to flow matching there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from flowmaps.conditions import Condition, labels_of, scale_of, weight_of, with_labels
from flowmaps.methods.base import AuxiliaryNetwork, Batch, LossContext, LossOutput, Method, mean_square
from flowmaps.methods.draw import AuxiliaryTerm, Draw, progress
from flowmaps.methods.grid_distillation import GridDistillation
from flowmaps.methods.options import (
    DiagonalSplitOptions, DiagonalTargetOptions, GridOptions, JVPOptions, Options, TargetOptions, WeightingOptions,
    pair_sampler,
)
from flowmaps.methods.targets import TargetNetwork
from flowmaps.nets.embeddings import NULL_CLASS
from flowmaps.posterior_targets import diagonal_velocity_target
from flowmaps.schedules import Schedule
from flowmaps.time_args import expand_like
from flowmaps.weighting import LossTerms, LossWeighting, row_norm, squared_norm

TANGENT_NORMS = ("l2", "rms")


def normalise_tangent(r: torch.Tensor, c: float, norm: str = "l2") -> torch.Tensor:
    """``r / (||r|| + c)`` per example (sCM's tangent normalisation, Lu & Song 2024, Alg. 1; AYF):
    ``||r||`` is the L2 norm over all features (``"l2"``, the paper's) or their root mean square
    (``"rms"``, ``||r||_2 / sqrt(D)``); ``c = 0`` returns ``r``."""
    if c == 0:
        return r
    size = r.reshape(r.shape[0], -1).norm(dim=1)
    if norm == "rms":
        size = size / r[0].numel() ** 0.5
    return r / expand_like(size + c, r)


def log_residual(terms: LossTerms, tangent: torch.Tensor, residual: torch.Tensor) -> None:
    """The diagnostics every rule logs: the norms of its tangent and of its residual."""
    terms.log("tangent_norm", row_norm(tangent))
    terms.log("residual_norm", row_norm(residual))


def semigradient(prediction: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``prediction - sg[prediction + step]``: its value is ``-step`` and its gradient flows through
    ``prediction`` only, so squaring it moves the prediction along ``step``."""
    return prediction - (prediction.detach() + step.detach())


class SkeletonMethod(Method):
    """The shared loss (module docstring); subclasses implement ``pair_loss``."""

    # the diagonal share when the options carry no ``diagonal_fraction`` (``DiagonalSplitOptions``)
    diagonal_fraction: ClassVar[float] = 0.0
    # one formula on every row (the diagonal rows with s = t go to ``pair_loss`` too)
    joint_rows: ClassVar[bool] = False

    def __init__(self, schedule: Schedule, options: Optional[Options] = None, teacher: Optional[Any] = None):
        super().__init__(schedule, options, teacher)
        o = self.options
        self.pairs = pair_sampler(o, self.diagonal_fraction)
        self.weighting = o.loss_weighting() if isinstance(o, WeightingOptions) else LossWeighting()
        self.target = self.make_target(o)
        self.diagonal_target = o.diagonal_target if isinstance(o, DiagonalTargetOptions) else "conditional"
        self.diagonal_warmup = o.diagonal_warmup if isinstance(o, DiagonalSplitOptions) else 0.0
        if self.diagonal_target == "teacher" and teacher is None:
            raise ValueError(f"diagonal_target 'teacher' of method {self.name!r} needs a teacher (--teacher)")
        self.auxiliary_terms: list[AuxiliaryTerm] = self.make_auxiliary_terms(o)

    # ----- construction hooks ------------------------------------------------------------------
    def make_target(self, options: Options) -> TargetNetwork:
        """The stop-gradient target of ``options`` (online weights when they have no ``TargetOptions``)."""
        if isinstance(options, TargetOptions):
            return TargetNetwork(options.target, options.target_ema_decay)
        return TargetNetwork()

    def make_auxiliary_terms(self, options: Options) -> list[AuxiliaryTerm]:
        """The auxiliary terms the options switch on (grid distillation)."""
        if isinstance(options, GridOptions) and options.grid_fraction > 0:
            return [GridDistillation(self.schedule, options, self.weighting.reduction)]
        return []

    @property
    def jvp_backend(self) -> str:
        return self.options.jvp_backend if isinstance(self.options, JVPOptions) else "auto"

    # ----- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.target.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.target.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"method {self.name!r}: {err}") from err

    def target_decay(self, ctx: LossContext) -> Optional[float]:
        """The EMA target's rate at this point of training (``None``: the configured one)."""
        return None

    # ----- randomness --------------------------------------------------------------------------
    def pair_times(self, pair: Batch, generator: torch.Generator, ctx: LossContext,
                   progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)`` of the pair rows; default: the ``TimePairSampler`` with its curriculum."""
        return self.pairs.sample_pairs(pair.x0.shape[0], generator, pair.x0.device, progress)

    def draw(self, batch: Batch, generator: torch.Generator, ctx: LossContext) -> Draw:
        x0 = batch.x0
        size, p = x0.shape[0], progress(ctx)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        n_diag = size if p < self.diagonal_warmup else self.pairs.split(size)[0]
        t_diag = self.pairs.times(n_diag, generator, x0.device).to(x0.dtype)
        pair = batch.take(slice(n_diag, None))
        s, t = (v.to(x0.dtype) for v in self.pair_times(pair, generator, ctx, p))
        return Draw(generator=generator, batch=batch, size=size, progress=p, diag=batch.take(slice(0, n_diag)),
                    t_diag=t_diag, eps_diag=eps[:n_diag], pair=pair, s=s, t=t, eps=eps[n_diag:],
                    x_s=self.schedule.sample_xt(pair.x0, eps[n_diag:], s))

    @staticmethod
    def joined(draw: Draw, schedule: Schedule) -> Draw:
        """``draw`` with the pair rows extended to the whole batch, the diagonal rows first (``s = t``
        there); ``n_diag`` still counts them."""
        s, t = torch.cat([draw.t_diag, draw.s]), torch.cat([draw.t_diag, draw.t])
        eps = torch.cat([draw.eps_diag, draw.eps])
        return dataclasses.replace(draw, pair=draw.batch, s=s, t=t, eps=eps, x_s=schedule.sample_xt(draw.batch.x0, eps, s))

    # ----- the diagonal ------------------------------------------------------------------------
    def diagonal_velocity(self, model: nn.Module, x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                          t: torch.Tensor, cond: Condition, references: Batch) -> torch.Tensor:
        """The velocity the diagonal ``V(x_t, t, t)`` regresses on: the teacher's, the conditional one,
        or the empirical velocity of ``references`` (the whole batch); guided at each row's scale when
        ``cond`` carries one (``guided_velocity``; a guided teacher reads the scales itself)."""
        if self.diagonal_target == "teacher":
            with torch.no_grad():
                return self.teacher.velocity(x_t, t, cond)
        estimate = diagonal_velocity_target(self.diagonal_target, self.schedule, x0, eps, t, labels_of(cond),
                                            references.x0, labels_of(references.cond))
        return self.guided_velocity(model, x_t, t, cond, estimate)

    def guided_velocity(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Condition,
                        estimate: torch.Tensor) -> torch.Tensor:
        """The guided velocity target of a guidance-conditioned student (spec §7; the MeanFlow/iMF recipe):
        ``v_w = w u + (1 - w) sg[V(x_t, t, t, None, w)]`` on the labelled rows, with ``u`` the estimate of
        the conditional velocity and the model's own unconditional diagonal under stop-gradient;
        ``estimate`` unchanged on the rows without a label and when ``cond`` carries no scale."""
        w = scale_of(cond)
        if w is None:
            return estimate
        labels = labels_of(cond)
        with torch.no_grad():
            unconditional = model(x_t, t, t, with_labels(cond, torch.full_like(labels, NULL_CLASS)), output="V",
                                  check_times=False)
        w = torch.where(labels == NULL_CLASS, torch.ones_like(w), w).to(estimate.dtype)
        return unconditional + expand_like(w, x_t) * (estimate - unconditional)

    def diagonal_loss(self, model: nn.Module, draw: Draw) -> torch.Tensor:
        """Per-example ``|V(x_t, t, t) - target|^2`` on the diagonal rows (``reduction`` of the method),
        times the rows' weights when the condition carries them."""
        d, t = draw.diag, draw.t_diag
        x_t = self.schedule.sample_xt(d.x0, draw.eps_diag, t)
        v = model(x_t, t, t, d.cond, output="V", check_times=False)
        target = self.diagonal_velocity(model, x_t, d.x0, draw.eps_diag, t, d.cond, draw.batch)
        per_example = squared_norm(v - target, self.weighting.reduction)
        weight = weight_of(d.cond)  # guidance-free training's beta^2 (flowmaps.train.distributed)
        return per_example if weight is None else weight.to(per_example.dtype) * per_example

    # ----- the rule ----------------------------------------------------------------------------
    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: LossContext) -> None:
        """Add the rule's per-example term(s) for the pair rows of ``draw`` to ``terms`` (a method without
        a rule, ``diagonal_fraction = 1``, has no pair rows)."""
        raise NotImplementedError(f"method {self.name!r} has no rule for pair rows")

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        ctx = ctx if ctx is not None else LossContext()
        self.target.update(model, self.target_decay(ctx))
        draw = self.draw(batch, generator, ctx)
        terms = LossTerms(draw.size)
        if draw.progress < self.diagonal_warmup:  # the whole batch on the diagonal, no rule yet
            terms.add("diagonal", self.diagonal_loss(model, draw))
            return LossOutput(*terms.result(), auxiliary_loss=terms.auxiliary)
        if self.joint_rows:
            self.pair_loss(model, self.joined(draw, self.schedule), terms, ctx)
        else:
            if draw.n_diag > 0:
                terms.add("diagonal", self.diagonal_loss(model, draw))
            if draw.s.shape[0] > 0:
                self.pair_loss(model, draw, terms, ctx)
        for term in self.auxiliary_terms:
            term.add(self, model, draw, ctx, terms)
        return LossOutput(*terms.result(), auxiliary_loss=terms.auxiliary)


# what a method's file needs besides its options: the skeleton and the types of its hooks
__all__ = ["SkeletonMethod", "TANGENT_NORMS", "log_residual", "normalise_tangent", "semigradient",
           "AuxiliaryNetwork", "Batch", "Draw", "LossContext", "LossTerms", "mean_square"]
