"""The training-method contract: ``method.loss(model, batch, generator) -> LossOutput``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from flowmaps.schedules import Schedule
from flowmaps.teachers import EMATarget


@dataclass
class Batch:
    """Clean data ``x0`` (``[B, ...]``), optional condition ``cond`` (``[B]``)."""

    x0: torch.Tensor
    cond: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.x0.dim() < 2:
            raise ValueError(f"a batch needs shape [B, ...] with at least one feature dim; got {tuple(self.x0.shape)}")
        if self.cond is not None and self.cond.shape[0] != self.x0.shape[0]:
            raise ValueError(f"cond has {self.cond.shape[0]} rows for a batch of {self.x0.shape[0]}")

    def take(self, index: slice) -> "Batch":
        return Batch(self.x0[index], None if self.cond is None else self.cond[index])


@dataclass
class LossContext:
    """What the trainer knows beyond the batch: progress (for curricula) and the EMA copy (for targets)."""

    step: int = 0
    total_steps: int = 1
    ema_model: Optional[nn.Module] = None


@dataclass
class LossOutput:
    """The scalar loss to back-propagate, detached per-term losses, and detached diagnostics."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(ABC):
    """A flow-map training method: one documented loss.

    Subclasses set the class attributes ``rule`` (``"diagonal"``, ``"lagrangian"``, ``"eulerian"``,
    ``"compositional"``), ``setting`` (``"scratch"``, ``"self-distillation"``, ``"teacher"``) and
    ``cost`` (forward-pass equivalents per iteration, spec §3) that ``flowmaps methods`` lists.
    The model passed to ``loss`` is a ``FlowMap`` (possibly wrapped by DDP): methods call it only
    through ``model(x, s, t, cond, output=..., check_times=False)``. Methods with
    ``needs_teacher = True`` take a ``teacher`` (``flowmaps.teachers.Teacher``) in their constructor.
    """

    name: str = ""
    rule: str = ""
    setting: str = ""
    cost: int = 0
    needs_teacher: bool = False
    # True when the teacher must be a trained network whose weights initialise the student (ECT):
    # the exact oracle cannot serve, a run directory must.
    initializes_from_teacher: bool = False
    # How the trained map samples in several steps: "flow_map" (compose F), "consistency" (maps trained
    # only towards t = 0: jump to data and re-noise), "one_step" (maps trained only from s = 1).
    multistep_sampler: str = "flow_map"

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def initialize(self, model: nn.Module) -> None:
        """Prepare ``model`` before the first step of a fresh run (not on resume); ECT copies its teacher here."""

    def state_dict(self) -> dict[str, Any]:
        """Training state the method owns (EMA target weights, ...), saved in checkpoints; tensors only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, but a checkpoint holds {sorted(state)}")

    @abstractmethod
    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, ctx: Optional[LossContext] = None
    ) -> LossOutput:
        """Draw noise and times with ``generator`` and return the loss on ``batch``."""


def mean_square(residual: torch.Tensor) -> torch.Tensor:
    """Per-example mean of squared residual entries: ``[B, ...] -> [B]``."""
    return residual.pow(2).reshape(residual.shape[0], -1).mean(dim=1)


class EMATargetState:
    """Mixin (listed before the ``Method`` base) for methods whose stop-gradient target is their own
    EMA of the online weights (``flowmaps.teachers.EMATarget``; decay 0: the online weights under
    stop-gradient, no state). The averaged weights are training state: ``state_dict`` returns them,
    so checkpoints and resumed runs carry them."""

    target: Optional[EMATarget]

    def init_target(self, decay: float) -> None:
        """Validate ``decay`` (``target_ema_decay``) and create the target (``None`` at decay 0)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"target_ema_decay of method {self.name!r} must lie in [0, 1) (0: the online weights "
                             f"under stop-gradient); got {decay}")
        self.target = EMATarget(decay) if decay > 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict()} if self.target is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.target is not None:
            self.target.load_state_dict(state.get("target", {}))
        else:
            super().load_state_dict(state)
