"""Shared machinery of the two-time methods (Lagrangian and Eulerian families).

A two-time method draws noise ``eps`` and times with a ``TimePairSampler``, splits the batch into
diagonal rows (time ``t``, trained by the diagonal loss) and pair rows (times ``(s, t)``, trained
by the method's rule at ``x_s = alpha(s) x_0 + sigma(s) eps``), turns residuals into per-example
losses with a ``LossWeighting`` and logs each term with ``LossTerms``. ``SplitBatchMethod``
subclasses implement ``pair_loss`` only; methods that treat every row alike (MeanFlow, iMF, TVM)
derive from ``TwoTimeMethod`` and implement ``loss``.

Options shared by every two-time method (constructor keywords, validated by name):

- times: ``diagonal_fraction``, ``time_distribution`` (``uniform`` | ``uniform_gap`` | ``logit_normal`` |
  ``gap_logit_normal``), ``direction`` (``backward`` | ``both``), ``logit_mean``, ``logit_std``,
  ``max_gap_start`` and ``gap_warmup`` (interval-length curriculum), see ``flowmaps.time_pairs``;
- weighting: ``penalty`` (``mse`` | ``pseudo_huber`` | ``cauchy``), ``penalty_c``, ``adaptive_p``,
  ``adaptive_c``, ``reduction`` (``mean`` | ``sum``), ``time_weight`` (``none`` | ``gap``), see
  ``flowmaps.weighting``;
- ``jvp_backend`` (``func`` | ``forward_ad`` | ``double_backward`` | ``finite_difference``), see
  ``flowmaps.jvp``;
- ``diagonal_target`` of the self-distillation methods without a teacher (``conditional`` |
  ``batch_posterior``), see ``flowmaps.posterior_targets``.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from flowmaps.jvp import check_backend
from flowmaps.methods.base import Batch, LossContext, LossOutput, Method
from flowmaps.posterior_targets import check_diagonal_target, diagonal_velocity_target
from flowmaps.schedules import Schedule
from flowmaps.time_pairs import TimePairSampler, progress_of
from flowmaps.weighting import LossTerms, LossWeighting, squared_norm


@dataclass
class Draw:
    """One batch's randomness: the diagonal rows (``diag``, times ``t_diag``, noise ``eps_diag``) and
    the pair rows (``pair``, times ``s`` and ``t``, noise ``eps`` and source points ``x_s``) of the
    whole ``batch``."""

    batch: Batch
    size: int
    progress: float
    diag: Batch
    t_diag: torch.Tensor
    eps_diag: torch.Tensor
    pair: Batch
    s: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    x_s: torch.Tensor


def progress(ctx: Optional[LossContext]) -> float:
    """Training progress for curricula; without a context, the end of training (1.0)."""
    return 1.0 if ctx is None else progress_of(ctx.step, ctx.total_steps)


def resolve_preset(presets: dict[str, dict[str, Any]], preset: str, method: str, **options: Any) -> dict[str, Any]:
    """Options left at ``None`` take the value of the named ``preset`` of ``method``."""
    if preset not in presets:
        raise ValueError(f"method {method!r} has no preset {preset!r}; its presets are {sorted(presets)}")
    return {k: (presets[preset][k] if v is None else v) for k, v in options.items()}


class TwoTimeMethod(Method):
    """Base class: draws, the diagonal term and the weighting; subclasses add the rule's term.

    Teacher methods pass ``teacher``; their diagonal rows (if any) regress ``V(x_t, t, t)`` on the
    teacher velocity ``v_T(x_t, t)``, the others on the conditional velocity ``alpha' x_0 + sigma' eps``
    (``diagonal_target="conditional"``) or on the velocity of the batch's empirical distribution
    (``"batch_posterior"``, a lower-variance target; ``flowmaps.posterior_targets``).
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        diagonal_fraction: float,
        time_distribution: str,
        direction: str,
        logit_mean: Any,
        logit_std: Any,
        max_gap_start: float,
        gap_warmup: float,
        penalty: str,
        penalty_c: float,
        adaptive_p: float,
        adaptive_c: float,
        reduction: str,
        time_weight: str,
        jvp_backend: str,
        teacher: Optional[Any] = None,
        gap_logit_mean: float = -0.8,
        gap_logit_std: float = 1.0,
        diagonal_target: str = "conditional",
    ):
        super().__init__(schedule)
        check_backend(jvp_backend, f"jvp_backend of method {self.name!r}")
        self.diagonal_target_name = check_diagonal_target(diagonal_target, self.name)
        self.pairs = TimePairSampler(
            diagonal_fraction, time_distribution, direction, logit_mean=logit_mean, logit_std=logit_std,
            gap_logit_mean=gap_logit_mean, gap_logit_std=gap_logit_std, max_gap_start=max_gap_start,
            gap_warmup=gap_warmup,
        )
        self.weighting = LossWeighting(penalty, penalty_c, adaptive_p, adaptive_c, reduction, time_weight)
        self.jvp_backend = jvp_backend
        self.teacher = teacher

    # ----- randomness -------------------------------------------------------------------------
    def draw(self, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext]) -> Draw:
        x0 = batch.x0
        size = x0.shape[0]
        p = progress(ctx)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        pairs = self.pairs.sample(size, generator, x0.device, p)
        n = pairs.t_diag.shape[0]
        pair = batch.take(slice(n, None))
        s, t = pairs.s.to(x0.dtype), pairs.t.to(x0.dtype)
        return Draw(
            batch=batch, size=size, progress=p,
            diag=batch.take(slice(0, n)), t_diag=pairs.t_diag.to(x0.dtype), eps_diag=eps[:n],
            pair=pair, s=s, t=t, eps=eps[n:], x_s=self.schedule.sample_xt(pair.x0, eps[n:], s),
        )

    # ----- the diagonal -----------------------------------------------------------------------
    def diagonal_target(self, x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                        cond: Optional[torch.Tensor], references: Batch) -> torch.Tensor:
        """The velocity the diagonal ``V(x_t, t, t)`` regresses on: the teacher's, the conditional one,
        or the empirical velocity of ``references`` (the whole batch)."""
        if self.teacher is not None:
            with torch.no_grad():
                return self.teacher.velocity(x_t, t, cond)
        return diagonal_velocity_target(self.diagonal_target_name, self.schedule, x0, eps, t, cond,
                                        references.x0, references.cond)

    def diagonal_loss(self, model: nn.Module, draw: Draw) -> torch.Tensor:
        """Per-example ``|V(x_t, t, t) - target|^2`` on the diagonal rows (``reduction`` of the method)."""
        d, t = draw.diag, draw.t_diag
        x_t = self.schedule.sample_xt(d.x0, draw.eps_diag, t)
        v = model(x_t, t, t, d.cond, output="V", check_times=False)
        target = self.diagonal_target(x_t, d.x0, draw.eps_diag, t, d.cond, draw.batch)
        return squared_norm(v - target, self.weighting.reduction)


class SplitBatchMethod(TwoTimeMethod):
    """A two-time method whose loss is the diagonal term on the diagonal rows plus ``pair_loss`` on
    the pair rows."""

    @abstractmethod
    def pair_loss(self, model: nn.Module, draw: Draw, terms: LossTerms, ctx: Optional[LossContext]) -> None:
        """Add the rule's per-example term(s) for the pair rows of ``draw`` to ``terms``."""

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        draw = self.draw(batch, generator, ctx)
        terms = LossTerms(draw.size)
        if draw.t_diag.shape[0] > 0:
            terms.add("diagonal", self.diagonal_loss(model, draw))
        if draw.s.shape[0] > 0:
            self.pair_loss(model, draw, terms, ctx)
        self.extra_loss(model, draw, generator, terms, ctx)
        return LossOutput(*terms.result())

    def extra_loss(self, model: nn.Module, draw: Draw, generator: torch.Generator, terms: LossTerms,
                   ctx: Optional[LossContext]) -> None:
        """Terms on rows of their own beyond the diagonal and pair rows (none by default)."""


def normalise_tangent(r: torch.Tensor, c: float) -> torch.Tensor:
    """``r / (|r| + c)`` per example (sCM / AYF tangent normalisation); ``c = 0`` returns ``r``."""
    if c == 0:
        return r
    norm = r.reshape(r.shape[0], -1).norm(dim=1)
    return r / (norm + c).reshape(-1, *([1] * (r.dim() - 1)))


def semigradient(prediction: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``prediction - sg[prediction + step]``: its value is ``-step`` and its gradient flows through
    ``prediction`` only, so squaring it moves the prediction along ``step``."""
    return prediction - (prediction.detach() + step.detach())


__all__ = ["Draw", "TwoTimeMethod", "SplitBatchMethod", "progress", "resolve_preset", "normalise_tangent", "semigradient"]
