"""A method wrapper that injects faults into a real method's loss at chosen steps."""

from __future__ import annotations

import os
import signal
from typing import Iterable, Optional

import torch
from torch import nn

from flowmaps.methods import Batch, LossContext, LossOutput, Method, build_method
from flowmaps.train import loop


class Faulty(Method):
    """Computes ``inner``'s loss, except:

    - at ``nan_steps`` the model's input is NaN in every row whose source time ``s`` exceeds 0.5 (so the
      loss is NaN and the guard's report must name those times); each such step misbehaves only on its
      first visit (and its replay), not when a rollback trains it again;
    - at ``grad_nan_steps`` a term that is 0 with an infinite derivative is added (finite loss, NaN gradients);
    - at ``spike_steps`` the loss is multiplied by 1e4 (finite: a loss spike), on the first visit only;
    - at ``sigterm_step`` the process sends itself SIGTERM (once).
    """

    def __init__(self, inner: Method, nan_steps: Iterable[int] = (), grad_nan_steps: Iterable[int] = (),
                 sigterm_step: Optional[int] = None, spike_steps: Iterable[int] = ()):
        super().__init__(inner.schedule)
        self.inner, self.name, self.options = inner, inner.name, inner.options
        self.backbone_defaults = type(inner).backbone_defaults  # the run trains the model it would without faults
        self.nan_steps, self.grad_nan_steps, self.spike_steps = set(nan_steps), set(grad_nan_steps), set(spike_steps)
        self.sigterm_step = sigterm_step
        self.visited: set[int] = set()
        self.current: Optional[int] = None

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator,
             ctx: Optional[LossContext] = None) -> LossOutput:
        step = ctx.step
        if self.current is not None and step != self.current:
            self.visited.add(self.current)
        self.current = step
        if step == self.sigterm_step:
            self.sigterm_step = None
            os.kill(os.getpid(), signal.SIGTERM)
        poisoned = step in self.nan_steps and step not in self.visited
        out = self.inner.loss(_poison_late_times(model) if poisoned else model, batch, generator, ctx)
        if step in self.grad_nan_steps:
            p = next(model.parameters())
            out.loss = out.loss + torch.sqrt((p - p.detach()).pow(2).sum())
        if step in self.spike_steps and step not in self.visited:
            out.loss = out.loss * 1e4
        return out


def _poison_late_times(model: nn.Module):
    def call(x, s, t, cond=None, **kw):
        sb = s if torch.is_tensor(s) else torch.full((x.shape[0],), float(s))
        late = (sb > 0.5).reshape(-1, *([1] * (x.dim() - 1)))
        return model(torch.where(late, torch.full_like(x, float("nan")), x), s, t, cond, **kw)

    return call


def install(monkeypatch, **faults) -> list[Faulty]:
    """Make the trainer wrap every method it builds in ``Faulty(**faults)``; returns the instances built."""
    built: list[Faulty] = []

    def build(name, schedule, teacher=None, **options):
        method = Faulty(build_method(name, schedule, teacher=teacher, **options), **faults)
        built.append(method)
        return method

    monkeypatch.setattr(loop, "build_method", build)
    return built
