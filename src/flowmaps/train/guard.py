"""The divergence guard: non-finite steps are skipped, explained, and end in a rollback or a stop.

A step is *non-finite* when its loss (on any rank) or its gradient norm is NaN or infinite. The
trainer then leaves the weights, optimiser and EMA untouched and counts a strike. ``diagnose``
explains the step: it names the non-finite loss terms and replays the loss of each affected
micro-batch (same data, same generator state) through the plain network with a recorder on every
``FlowMap`` call, listing the calls whose input or output was non-finite with the times ``(s, t)``
of the offending rows; for a finite loss with non-finite gradients it names the parameters.

After ``guard.max_strikes`` strikes since the last checkpoint (or rollback) the guard decides:
``on_divergence = "rollback"`` restores the last good checkpoint and multiplies the learning rate
by ``guard.lr_factor`` (at most ``guard.max_rollbacks`` times); otherwise, or when rollbacks are
used up or no checkpoint exists, the run stops with ``DivergenceError`` and its reports.

Loss spikes (``guard.spike_factor > 0``): a finite step whose loss (the mean over ranks) exceeds
``spike_factor`` times the median of the last ``guard.spike_window`` accepted losses is also
skipped. Self-distillation can produce such steps: a row whose jump lands far from the data gets
a target from where the network has never been trained, the loss of one batch jumps a
thousandfold, and its clipped gradient is an outsized Adam step. An isolated spike is only skipped;
``guard.max_strikes`` spikes in a row mean the loss has left its range for good (a spike is judged
against accepted steps only) and count as a divergence: rollback or stop, as above.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Sequence

import torch
from torch import nn

from flowmaps.flow_map import FlowMap
from flowmaps.methods import LossContext, LossOutput, Method
from flowmaps.time_args import as_batch_time
from flowmaps.train.config import GuardConfig
from flowmaps.train.distributed import MicroBatch

MAX_TIMES = 8  # offending (s, t) pairs listed per model call


class DivergenceError(FloatingPointError):
    """Training stopped because of non-finite steps; ``reports`` explains each of them."""

    def __init__(self, message: str, reports: Sequence[dict[str, Any]]):
        super().__init__(message)
        self.reports = list(reports)


class DivergenceGuard:
    """Counts strikes and decides ``"skip"``, ``"rollback"`` or ``"stop"``; carries the learning-rate scale."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.strikes = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.recent: deque[float] = deque(maxlen=cfg.spike_window)
        self.spikes_in_a_row = 0

    def is_spike(self, loss: float) -> bool:
        """Whether a finite step's ``loss`` is a spike (module docstring); a non-spike is remembered
        as accepted and ends a run of spikes. Never a spike before ``spike_window`` losses are known, or
        while their median is 0."""
        if not self.cfg.spike_factor:
            return False
        median = statistics.median(self.recent) if len(self.recent) == self.recent.maxlen else 0.0
        if median > 0 and loss > self.cfg.spike_factor * median:
            return True
        self.recent.append(loss)
        self.spikes_in_a_row = 0
        return False

    def spike(self) -> str:
        """Count a skipped spike: ``"skip"``, or after ``max_strikes`` in a row the divergence decision."""
        self.spikes_in_a_row += 1
        if self.spikes_in_a_row < self.cfg.max_strikes:
            return "skip"
        self.spikes_in_a_row = 0
        return self._divergence_action()

    def strike(self) -> str:
        """Count a non-finite step and say what to do about it."""
        self.strikes += 1
        if self.strikes < self.cfg.max_strikes:
            return "skip"
        return self._divergence_action()

    def _divergence_action(self) -> str:
        if self.cfg.on_divergence == "rollback" and self.rollbacks < self.cfg.max_rollbacks:
            return "rollback"
        return "stop"

    def checkpointed(self) -> None:
        """A checkpoint of healthy weights was written: strikes start again from zero."""
        self.strikes = 0

    def rolled_back(self) -> None:
        """Called after the trainer restored a checkpoint: lower the learning rate, clear the strikes."""
        self.rollbacks += 1
        self.strikes = 0
        self.lr_scale *= self.cfg.lr_factor

    def state_dict(self) -> dict[str, Any]:
        return {"strikes": self.strikes, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
                "recent_losses": list(self.recent), "spikes_in_a_row": self.spikes_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strikes, self.rollbacks = int(state["strikes"]), int(state["rollbacks"])
        self.lr_scale = float(state["lr_scale"])
        self.recent = deque((float(v) for v in state.get("recent_losses", [])), maxlen=self.cfg.spike_window)
        self.spikes_in_a_row = int(state.get("spikes_in_a_row", 0))


def _rows_bad(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)


class NonFiniteRecorder:
    """A forward hook on every ``FlowMap`` inside a module that records calls with non-finite input or output."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.calls = 0
        self.records: list[dict[str, Any]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "NonFiniteRecorder":
        flow_maps = [m for m in self.model.modules() if isinstance(m, FlowMap)]
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in flow_maps]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        self.calls += 1
        names = ("x", "s", "t")
        x, s, t = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        outputs = out if isinstance(out, tuple) else (out,)  # (value, tangent) from a call with tangents
        bad_in, bad_out = _rows_bad(x), torch.stack([_rows_bad(o) for o in outputs]).any(dim=0)
        bad = bad_in | bad_out
        if not bool(bad.any()):
            return
        sb, tb = as_batch_time(s, x, "s")[bad], as_batch_time(t, x, "t")[bad]
        self.records.append({
            "call": self.calls,
            "output": kwargs.get("output", "F"),
            "rows": int(bad.sum()),
            "of": int(x.shape[0]),
            "input_nonfinite": int(bad_in.sum()),
            "times": [[round(a, 6), round(b, 6)] for a, b in zip(sb[:MAX_TIMES].tolist(), tb[:MAX_TIMES].tolist())],
        })


def diagnose(
    method: Method,
    model: nn.Module,
    micro_batches: Sequence[MicroBatch],
    outputs: Sequence[LossOutput],
    ctx: LossContext,
    grad_norm: float,
    losses_finite: bool,
    rank: int = 0,
) -> dict[str, Any]:
    """Explain a non-finite step of this process (see the module docstring).

    ``model`` is the plain network (no DDP, no compilation); the generators of the micro-batches are
    left exactly where the step left them, so the training stream is unchanged by the replay.
    ``losses_finite`` says whether the loss was finite on every rank (then the gradients are to blame).
    """
    report: dict[str, Any] = {"rank": rank, "grad_norm": grad_norm, "micro_batches": []}
    for mb, out in zip(micro_batches, outputs):
        loss = float(out.loss.detach())
        terms = {k: float(v) for k, v in out.terms.items()}
        entry: dict[str, Any] = {
            "shard": mb.shard,
            "loss": loss,
            "nonfinite_terms": sorted(k for k, v in terms.items() if not math.isfinite(v)),
            "terms": terms,
            "data_nonfinite_rows": int(_rows_bad(mb.batch.x0).sum()),
        }
        if not math.isfinite(loss):
            entry["model_calls"] = _replay(method, model, mb, ctx)
        report["micro_batches"].append(entry)
    if losses_finite and not math.isfinite(grad_norm):
        report["nonfinite_grads"] = [
            name for name, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
    return report


def _replay(method: Method, model: nn.Module, mb: MicroBatch, ctx: LossContext) -> list[dict[str, Any]]:
    after = mb.generator.get_state()
    mb.generator.set_state(mb.generator_state)
    try:
        with NonFiniteRecorder(model) as recorder:
            method.loss(model, mb.batch, mb.generator, ctx)
    finally:
        mb.generator.set_state(after)
    return recorder.records


def summarize(step: int, reports: Sequence[dict[str, Any]]) -> str:
    """One line for a non-finite step: the terms and the model calls (with times) that went wrong."""
    parts = []
    for report in reports:
        for mb in report["micro_batches"]:
            if math.isfinite(mb["loss"]):
                continue
            terms = ", ".join(mb["nonfinite_terms"]) or "the total only"
            where = f"rank {report['rank']} shard {mb['shard']}"
            line = f"{where}: loss {mb['loss']}, non-finite terms: {terms}"
            if mb["data_nonfinite_rows"]:
                line += f"; {mb['data_nonfinite_rows']} data rows are non-finite"
            for call in mb.get("model_calls", [])[:3]:
                source = "input" if call["input_nonfinite"] else "output"
                times = ", ".join(f"({s:.4g}, {t:.4g})" for s, t in call["times"][:4])
                line += (f"; model call {call['call']} ({call['output']}) has a non-finite {source} in "
                         f"{call['rows']}/{call['of']} rows at (s, t) = {times}")
            if not mb.get("model_calls"):
                line += "; every model call was finite (the loss formula itself produced it)"
            parts.append(line)
        if "nonfinite_grads" in report:
            names = report["nonfinite_grads"]
            parts.append(f"rank {report['rank']}: the loss is finite but the gradient norm is "
                         f"{report['grad_norm']}; non-finite gradients in {len(names)} parameter(s): "
                         f"{', '.join(names[:5])}")
    return f"step {step}: non-finite step skipped — " + " | ".join(parts)


__all__ = ["DivergenceError", "DivergenceGuard", "NonFiniteRecorder", "diagnose", "summarize"]
