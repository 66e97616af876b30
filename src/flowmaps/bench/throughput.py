"""Sampling throughput per NFE: the flow-map sampler against the diagonal ODE sampler, same model.

Both samplers call the same network once per NFE (Heun twice per step), so at equal NFE their
throughput should agree up to the sampler's own overhead; what a flow map buys is quality at a
small NFE (the quality tables). This module measures rather than assumes: it times each sampler
with ``time.perf_counter`` (the fastest of ``repeats`` runs after a warm-up call: the one least
disturbed by other load on a shared machine) and counts the network calls with
``flowmaps.metrics.NFECounter``. Training-iteration cost per method is measured by
``benchmarks/method_cost.py``, not here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from flowmaps.metrics import NFECounter
from flowmaps.samplers import sample_flow_map, sample_ode


@dataclass
class Throughput:
    """``samples_per_second`` of ``sampler`` with ``steps`` steps (``nfe`` network calls) on a batch of ``batch``."""

    sampler: str
    steps: int
    nfe: int
    batch: int
    seconds: float
    samples_per_second: float


@torch.no_grad()
def sampling_throughput(
    model: nn.Module,
    shape: Union[int, tuple[int, ...]],
    batch: int = 4096,
    flow_map_steps: Sequence[int] = (1, 2, 4, 8, 16),
    ode_nfe: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
    ode_solvers: Sequence[str] = ("euler", "heun"),
    repeats: int = 3,
    seed: int = 0,
) -> list[Throughput]:
    """Time ``sample_flow_map`` and ``sample_ode`` on ``batch`` noise samples of ``shape`` (an int: vectors).

    The ODE samplers run at each NFE budget of ``ode_nfe`` (Heun with ``nfe / 2`` steps, so only
    at even budgets); each timing is the fastest of ``repeats`` runs after one warm-up call.
    """
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch and repeats must be positive; got {batch}, {repeats}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    noise = torch.randn(batch, *shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    counter = NFECounter(model)
    jobs = [("flow map", k, lambda k=k: sample_flow_map(counter, noise, k)) for k in flow_map_steps]
    for solver in ode_solvers:
        per_step = 2 if solver == "heun" else 1
        jobs += [(f"ODE {solver}", n // per_step, lambda k=n // per_step, solver=solver: sample_ode(counter, noise, k, solver))
                 for n in ode_nfe if n % per_step == 0]
    sample_flow_map(model, noise, 1)  # warm-up
    out = []
    for sampler, steps, run in jobs:
        times = []
        for _ in range(repeats):
            counter.reset()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        seconds = min(times)
        out.append(Throughput(sampler, steps, counter.calls, batch, seconds, batch / seconds))
    return out


def throughput_table(rows: Sequence[Throughput]) -> str:
    """A Markdown table: sampler, steps, NFE, seconds per batch, samples per second."""
    lines = ["| sampler | steps | NFE | seconds per batch | samples / s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.sampler} | {r.steps} | {r.nfe} | {r.seconds:.4f} | {r.samples_per_second:,.0f} |")
    return "\n".join(lines)
