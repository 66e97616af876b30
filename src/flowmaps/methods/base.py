"""The training-method contract: ``method.loss(model, batch, generator, ctx) -> LossOutput``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from flowmaps.methods.options import Options
from flowmaps.schedules import Schedule


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
    """What the trainer knows beyond the batch: progress (for curricula), the EMA copy (for targets) and
    the auxiliary networks it owns for the method (``Method.auxiliary_networks``)."""

    step: int = 0
    total_steps: int = 1
    ema_model: Optional[nn.Module] = None
    auxiliary: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class LossOutput:
    """The scalar loss to back-propagate, detached per-term losses and diagnostics, and the loss of the
    auxiliary networks (trained by the trainer beside the model; ``None`` when the method has none)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    auxiliary_loss: Optional[torch.Tensor] = None


@dataclass
class AuxiliaryNetwork:
    """A network the trainer trains for a method (FreeFlow's denoiser): built once, optimised with Adam at
    ``lr`` on ``LossOutput.auxiliary_loss``, checkpointed and averaged over processes by the trainer."""

    module: nn.Module
    lr: float


@dataclass
class NoOptions(Options):
    """The options of a method that has none."""


class Method(ABC):
    """A flow-map training method: one documented loss.

    Class attributes that ``flowmaps methods`` lists: ``rule`` (``"diagonal"``, ``"lagrangian"``,
    ``"eulerian"``, ``"compositional"``), ``setting`` (``"scratch"``, ``"self-distillation"``,
    ``"teacher"``) and ``cost`` (forward-pass equivalents per iteration, spec §3). ``Options`` is the
    method's options dataclass (``flowmaps.methods.options``); ``presets`` maps preset names to option
    values. ``sampler`` names the sampler its maps are drawn with (``flowmaps.samplers.SAMPLERS``):
    ``flow_map`` (compose ``F``), ``consistency`` (maps trained only towards ``t = 0``), ``one_step``
    (maps trained only from ``s = 1``). The model passed to ``loss`` is a ``FlowMap`` (possibly wrapped
    by DDP): methods call it only through ``model(x, s, t, cond, output=..., check_times=False)``.
    Methods with ``needs_teacher = True`` receive a teacher (``velocity(x, t, cond)``).
    """

    name: str = ""
    rule: str = ""
    setting: str = ""
    cost: int = 0
    needs_teacher: bool = False
    # True when the teacher must be a trained network whose weights initialise the student (ECT).
    initializes_from_teacher: bool = False
    sampler: str = "flow_map"
    Options: ClassVar[type[Options]] = NoOptions
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # what the method's defaults were tuned with, per backbone: {backbone: {"lr": optim.lr, option: value}};
    # a config that leaves optim.lr or one of those backbone options unset takes them (flowmaps.build.resolve_config)
    backbone_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # the preset a method with ``presets`` takes on a backbone where the config names none ({backbone: preset};
    # elsewhere its ``preset`` option's default): a preset measured on one kind of data need not suit another
    backbone_presets: ClassVar[dict[str, str]] = {}
    # options under which the loss is consistent, so that the exact flow map is its fixed point (a step
    # shrunk to its limit, an auxiliary task switched off); the registry-driven tests check it there
    exact_limit: ClassVar[dict[str, Any]] = {}

    def __init__(self, schedule: Schedule, options: Optional[Options] = None, teacher: Optional[Any] = None):
        self.schedule = schedule
        self.options = options if options is not None else type(self).Options()
        self.teacher = teacher

    def initialize(self, model: nn.Module) -> None:
        """Prepare ``model`` before the first step of a fresh run (not on resume); ECT copies its teacher here."""

    def auxiliary_networks(self, sample_shape: tuple[int, ...], num_classes: int = 0) -> dict[str, AuxiliaryNetwork]:
        """Networks the trainer owns and trains for this method on data of ``sample_shape`` with the model's
        ``num_classes`` (none by default)."""
        return {}

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


__all__ = ["Batch", "LossContext", "LossOutput", "AuxiliaryNetwork", "Method", "NoOptions", "mean_square"]
