"""Stop-gradient targets: the one mechanism behind every ``sg[F_target(.)]`` of the methods.

A self-distillation or consistency target evaluates the network without gradient with one of
three sets of weights (``TargetOptions.target``):

- ``"online"``: the online weights under stop-gradient, ``sg[F_theta]`` (Boffi et al.'s LSD/ESD/PSD,
  iCT, sCM);
- ``"ema"``: the method's own EMA ``theta^- <- d theta^- + (1 - d) sg[theta]`` (``target_ema_decay``;
  CT, CD, CTM, TVM), updated at the start of every loss call; its weights are training state
  (``state_dict``, saved in checkpoints). Decay 0 is the online weights;
- ``"trainer"``: the trainer's evaluation EMA (``LossContext.ema_model``; shortcut models, grid
  distillation), or the online weights where no trainer passes one.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from flowmaps.methods.base import LossContext


class EMATarget:
    """``theta_target <- d theta_target + (1 - d) theta``, evaluated through the online model itself.

    The averaged weights live here, not in a copy of the module: ``__call__`` runs the online model
    (possibly wrapped by ``DistributedDataParallel``) with them via ``torch.func.functional_call``,
    without gradient, so nothing reaches into a wrapper. The first ``update`` copies the weights.
    """

    def __init__(self, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA target decay must lie in [0, 1); got {decay}")
        self.decay = decay
        self.state: Optional[dict[str, torch.Tensor]] = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = dict(model.named_parameters())
        if self.state is None or set(self.state) != set(current):
            self.state = {k: p.detach().clone() for k, p in current.items()}
            return
        for k, p in current.items():
            if self.state[k].device != p.device or self.state[k].dtype != p.dtype:  # e.g. loaded from a checkpoint
                self.state[k] = self.state[k].to(p.device, p.dtype)
            self.state[k].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (empty before the first update), for checkpoints."""
        return {} if self.state is None else {k: v.detach().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()} if state else None

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
        cond: Optional[torch.Tensor] = None, output: str = "V",
    ) -> torch.Tensor:
        if self.state is None:
            raise RuntimeError("EMATarget was called before its first update(model)")
        return torch.func.functional_call(model, self.state, (x, s, t, cond), {"output": output, "check_times": False})


class TargetNetwork:
    """``sg[F_target(x, s, t, cond)]`` with the online weights, the method's EMA or the trainer's EMA."""

    def __init__(self, kind: str = "online", decay: float = 0.0):
        self.kind = "online" if kind == "ema" and decay == 0 else kind
        self.ema = EMATarget(decay) if self.kind == "ema" else None

    def update(self, model: nn.Module, decay: Optional[float] = None) -> None:
        """Move the method's EMA towards ``model`` (rate ``decay``, default the configured one); else nothing."""
        if self.ema is not None:
            if decay is not None:
                self.ema.decay = decay
            self.ema.update(model)

    @torch.no_grad()
    def __call__(self, model: nn.Module, ctx: Optional[LossContext], x: torch.Tensor, s: torch.Tensor,
                 t: torch.Tensor, cond: Optional[torch.Tensor] = None, output: str = "F") -> torch.Tensor:
        if self.ema is not None:
            return self.ema(model, x, s, t, cond, output=output)
        network = ctx.ema_model if self.kind == "trainer" and ctx is not None and ctx.ema_model is not None else model
        return network(x, s, t, cond, output=output, check_times=False)

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state.get("target", {}))
        elif state:
            raise ValueError(f"a {self.kind} target keeps no state, but a checkpoint holds {sorted(state)}")


__all__ = ["EMATarget", "TargetNetwork"]
