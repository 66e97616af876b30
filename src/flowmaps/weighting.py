"""Loss weighting: squared norms with a stated reduction, robust penalties, adaptive and time weights.

A loss turns a residual ``R`` (``[B, ...]``) into one number per example and then averages:

1. ``squared_norm(R, reduction)``: ``|R|^2`` summed (``"sum"``, the squared L2 norm used by
   MeanFlow and iMF) or averaged (``"mean"``) over the feature dimensions. The reduction matters
   for the constants below: ``c`` acts on this number.
2. a penalty ``rho(|R|^2)``: ``"mse"`` (``rho(q) = q``); ``"pseudo_huber"`` (iCT, Song & Dhariwal
   2023: ``sqrt(q + c^2) - c``); ``"cauchy"`` (Decoupled MeanFlow: ``c^2 log(1 + q / c^2)``, which
   equals ``q`` for small residuals and grows only logarithmically for outliers).
3. an adaptive weight (MeanFlow, Geng et al. 2025): ``w = sg[1 / (|R|^2 + c)^p]``; ``p = 0`` turns
   it off, ``p = 1`` makes the loss scale-free (about ``|R|^2 / |R|^2``) and damps examples with
   large residuals, ``p = 0.5`` is a pseudo-Huber-like middle.
4. a time weight ``lambda(s, t)``: ``"none"`` (1) or ``"gap"`` (``|t - s|``; the flow-map form of a
   loss on ``F = x + (t - s) V`` equals its average-velocity form weighted by ``|t - s|``).

Caveat, stated where it bites: a marginal-from-conditional loss (MeanFlow, iMF, the diagonal loss)
is unbiased only with the plain MSE. A robust penalty or an adaptive weight makes the update
nonlinear in the conditional velocity; its fixed point then differs from the marginal unless the
conditional residual is symmetric about zero (true for Gaussian data, not for mixtures).

``LossTerms`` collects per-example losses of named terms and reduces them to the scalar loss with
per-term logs and diagnostics.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

REDUCTIONS = ("sum", "mean")
PENALTIES = ("mse", "pseudo_huber", "cauchy")
TIME_WEIGHTS = ("none", "gap")


def squared_norm(residual: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``[B, ...] -> [B]``: squared residual entries summed or averaged over the feature dimensions."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    sq = residual.pow(2).reshape(residual.shape[0], -1)
    return sq.sum(dim=1) if reduction == "sum" else sq.mean(dim=1)


def penalty(sq: torch.Tensor, kind: str = "mse", c: float = 1.0) -> torch.Tensor:
    """The penalty ``rho(q)`` of a per-example squared norm ``q`` (module docstring)."""
    if kind == "mse":
        return sq
    if kind == "pseudo_huber":
        return sq / (torch.sqrt(sq + c**2) + c)  # = sqrt(q + c^2) - c without cancellation at small q
    if kind == "cauchy":
        return c**2 * torch.log1p(sq / c**2)
    raise ValueError(f"unknown penalty {kind!r}; choose one of {PENALTIES}")


def adaptive_weight(sq: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """``sg[1 / (q + c)^p]`` for per-example squared norms ``q``."""
    return 1.0 / (sq.detach() + c) ** p


def time_weight(kind: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``lambda(s, t)`` per example: ``"none"`` (ones) or ``"gap"`` (``|t - s|``)."""
    if kind == "none":
        return torch.ones_like(s)
    if kind == "gap":
        return (t - s).abs()
    raise ValueError(f"unknown time weight {kind!r}; choose one of {TIME_WEIGHTS}")


class LossWeighting:
    """``lambda(s, t) * w * rho(|R|^2)`` per example, with the options validated by name.

    ``penalty_c`` is the scale ``c`` of the robust penalty (``None``: iCT's ``0.00054 sqrt(D)`` for ``D``
    features per example, Song & Dhariwal 2023), ``adaptive_p`` / ``adaptive_c`` the power and offset of
    the adaptive weight, all acting on ``|R|^2`` under ``reduction``.
    """

    def __init__(
        self,
        penalty: str = "mse",
        penalty_c: Optional[float] = 1e-3,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        reduction: str = "mean",
        time_weight: str = "none",
    ):
        if penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {penalty!r}; choose one of {PENALTIES}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
        if time_weight not in TIME_WEIGHTS:
            raise ValueError(f"unknown time_weight {time_weight!r}; choose one of {TIME_WEIGHTS}")
        if penalty_c is not None and not penalty_c > 0:
            raise ValueError(f"penalty_c must be positive (or None for 0.00054 sqrt(D)); got {penalty_c}")
        if not adaptive_p >= 0:
            raise ValueError(f"adaptive_p must be non-negative; got {adaptive_p}")
        if not adaptive_c > 0:
            raise ValueError(f"adaptive_c must be positive; got {adaptive_c}")
        self.penalty, self.penalty_c = penalty, penalty_c
        self.adaptive_p, self.adaptive_c = adaptive_p, adaptive_c
        self.reduction, self.time_weight = reduction, time_weight

    def __call__(
        self, residual: torch.Tensor, s: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Per-example weighted loss ``[B]`` of a residual ``[B, ...]`` at times ``(s, t)``."""
        sq = squared_norm(residual, self.reduction)
        c = self.penalty_c if self.penalty_c is not None else 0.00054 * math.sqrt(residual[0].numel())
        loss = penalty(sq, self.penalty, c)
        if self.adaptive_p > 0:
            loss = loss * adaptive_weight(sq, self.adaptive_p, self.adaptive_c)
        if self.time_weight != "none":
            if s is None or t is None:
                raise ValueError(f"time_weight {self.time_weight!r} needs the times (s, t)")
            loss = loss * time_weight(self.time_weight, s, t)
        return loss


def row_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm ``[B, ...] -> [B]``."""
    return x.detach().reshape(x.shape[0], -1).norm(dim=1)


class LossTerms:
    """Collect per-example losses of named terms; ``result()`` is ``(loss, terms, diagnostics)``.

    The scalar loss is ``sum over terms and rows / batch`` (``batch`` = rows in the whole batch), so a
    method that splits its batch between terms weights each example once, and a method that applies
    two terms to every row adds them. ``terms[name]`` logs each term's mean over its own rows.
    """

    def __init__(self, batch: int):
        self.batch = batch
        self.parts: list[torch.Tensor] = []
        self.terms: dict[str, torch.Tensor] = {}
        self.diagnostics: dict[str, torch.Tensor] = {}
        self.auxiliary: Optional[torch.Tensor] = None

    def add(self, name: str, per_example: torch.Tensor) -> None:
        if per_example.numel() == 0:
            return
        self.parts.append(per_example)
        self.terms[name] = per_example.detach().mean()

    def log(self, name: str, value: torch.Tensor) -> None:
        """A detached diagnostic (its batch mean when ``value`` has one entry per example)."""
        self.diagnostics[name] = value.detach().float().mean()

    def add_auxiliary(self, name: str, loss: torch.Tensor) -> None:
        """The scalar loss of the trainer-owned auxiliary networks (logged as the diagnostic ``name``)."""
        self.auxiliary = loss if self.auxiliary is None else self.auxiliary + loss
        self.log(name, loss)

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if not self.parts:
            raise ValueError("no loss term received any examples: the batch is empty")
        loss = sum(p.sum() for p in self.parts) / self.batch
        return loss, self.terms, self.diagnostics


__all__ = [
    "REDUCTIONS", "PENALTIES", "TIME_WEIGHTS", "squared_norm", "penalty", "adaptive_weight", "time_weight",
    "LossWeighting", "row_norm", "LossTerms",
]
