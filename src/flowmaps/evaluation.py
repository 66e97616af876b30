"""End-of-run evaluation: sample quality of the flow map at each NFE and of the ODE baseline."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from flowmaps import metrics
from flowmaps.data import DataSource
from flowmaps.samplers import get_sampler, ode_nfe, sample_ode
from flowmaps.schedules import Schedule
from flowmaps.train.config import EvalConfig

ENERGY_SAMPLES = 4096
MMD_SAMPLES = 2048


def sample_metrics(samples: torch.Tensor, reference: torch.Tensor, data_name: str) -> dict[str, float]:
    """Energy distance (first 4096 points), MMD (first 2048), sliced Wasserstein and, for the
    checkerboard, the histogram KL (all points) of ``samples`` under both estimators of the bin
    probabilities (``hist_kl``: exact; ``hist_kl_midpoint``: the density at the bin centres)."""
    out = {
        "energy_distance": metrics.energy_distance(samples[:ENERGY_SAMPLES], reference[:ENERGY_SAMPLES]),
        "mmd": metrics.mmd(samples[:MMD_SAMPLES], reference[:MMD_SAMPLES]),
        "sliced_w2": metrics.sliced_wasserstein(samples, reference),
    }
    if data_name == "checkerboard":
        out["hist_kl"] = metrics.histogram_kl(metrics.checkerboard_bin_probs(), samples)
        out["hist_kl_midpoint"] = metrics.histogram_kl(metrics.checkerboard_bin_probs(estimator="midpoint"), samples)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DataSource,
    cfg: EvalConfig,
    seed: int,
    device: torch.device,
    sampler: str = "flow_map",
    schedule: Optional[Schedule] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metrics of ``model``'s samples against fresh data, with the floor of two exact data samples.

    ``sampler`` is the method's own (``flowmaps.samplers.SAMPLERS``), run at every ``cfg.nfe`` it
    supports on the grid ``time_grid(k, rho=cfg.grid_rho)``; ``consistency`` re-noises with
    ``schedule`` between steps. Samplers whose map has a trained diagonal (``flow_map``) add the
    diagonal's ODE baseline. Returns ``(metrics, samples)``; ``samples`` maps panel names (``data``,
    ``1 step``, ..., ``ODE heun (64 NFE)``) to ``[n, D]`` CPU tensors for plotting.
    """
    chosen = get_sampler(sampler)
    gen = torch.Generator(device=device).manual_seed(seed + 7919)
    n = cfg.n_samples
    reference = data.sample(n, gen).cpu()
    second = data.sample(n, gen).cpu()
    noise = torch.randn(n, data.dim, generator=gen, device=device)
    results: dict[str, Any] = {
        "floor (two data samples)": sample_metrics(second, reference, data.name),
        "noise (untrained scale)": sample_metrics(noise.cpu(), reference, data.name),
    }
    panels = {"data": reference}
    for k in [k for k in cfg.nfe if chosen.max_steps is None or k <= chosen.max_steps]:
        x = chosen.sample(model, noise, k, rho=cfg.grid_rho, schedule=schedule, generator=gen).cpu()
        results[chosen.label(k, cfg.grid_rho)] = {"nfe": k, **sample_metrics(x, reference, data.name)}
        panels[f"{k} step{'s' if k > 1 else ''}"] = x
    if chosen.ode_baseline:
        x = sample_ode(model, noise, cfg.ode_steps, cfg.ode_solver).cpu()
        nfe = ode_nfe(cfg.ode_steps, cfg.ode_solver)
        results[f"ODE {cfg.ode_solver} {cfg.ode_steps} steps"] = {"nfe": nfe, **sample_metrics(x, reference, data.name)}
        panels[f"ODE {cfg.ode_solver} ({nfe} NFE)"] = x
    return results, panels


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table with one row per sampler and one column per metric."""
    columns = sorted({k for row in results.values() for k in row if k != "nfe"})
    lines = ["| sampler | NFE | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, row in results.items():
        cells = [f"{row[c]:.4g}" if c in row else "" for c in columns]
        lines.append(f"| {name} | {row.get('nfe', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
