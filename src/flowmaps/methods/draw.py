"""One batch's randomness as the skeleton draws it, and the protocol of auxiliary loss terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import nn

from flowmaps.methods.base import Batch, LossContext
from flowmaps.time_pairs import progress_of
from flowmaps.weighting import LossTerms


@dataclass
class Draw:
    """One batch's randomness: the diagonal rows (``diag``, times ``t_diag``, noise ``eps_diag``) and
    the pair rows (``pair``, times ``s`` and ``t``, noise ``eps`` and source points ``x_s``) of the
    whole ``batch``, and the ``generator`` that every further draw of the loss uses."""

    generator: torch.Generator
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

    @property
    def n_diag(self) -> int:
        return self.t_diag.shape[0]


class AuxiliaryTerm(Protocol):
    """A loss term on rows of its own, added after the method's terms (grid distillation, ...)."""

    def add(self, method: Any, model: nn.Module, draw: Draw, ctx: LossContext, terms: LossTerms) -> None: ...


def progress(ctx: Optional[LossContext]) -> float:
    """Training progress for curricula; without a context, the end of training (1.0)."""
    return 1.0 if ctx is None else progress_of(ctx.step, ctx.total_steps)


__all__ = ["Draw", "AuxiliaryTerm", "progress"]
