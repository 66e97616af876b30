"""Train every method on every dataset with an equal budget and measure it against exact samples.

For each dataset and seed the runner draws one set of exact reference samples, a second exact
set (the metrics' floor), and one set of noise shared by every sampler; for mixture data it also
solves the exact flow map once (``flowmaps.metrics.flow_map_reference``) and runs the ODE sampler
on the exact velocity (the discretisation error alone). Then, per method, it trains through
``flowmaps.train.loop.train`` and measures the EMA model:

- the method's own multistep sampler at each step count in ``cfg.nfe``: the flow map ``F``
  composed over a uniform grid, or, for maps trained only towards ``t = 0``
  (``multistep_sampler = "consistency"``), consistency multistep sampling (jump to data, re-noise),
  or, for maps trained only from ``s = 1`` (``"one_step"``), one step alone; ``diagonal`` methods
  such as ``fm`` get none (their off-diagonal is never trained);
- the diagonal ODE sampler at each of ``cfg.ode_steps`` (flow matching, or every method with
  ``ode_scope="all"``);
- the flow-map error over a grid of ``(s, t)`` pairs (mixture data, non-diagonal methods;
  restricted to the pairs the method trains: ``t = 0`` for consistency maps, ``s = 1`` for
  one-step maps).

Each measurement is one ``Row``; ``flowmaps.bench.report`` aggregates and writes them. A method
that needs a teacher runs with ``--teacher exact`` on mixture data and is skipped with a note on
other data; a method that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from flowmaps import metrics
from flowmaps.bench.config import BenchConfig
from flowmaps.data import DataSource, get_data
from flowmaps.evaluation import sample_metrics
from flowmaps.flow_map import FlowMap
from flowmaps.methods import get_method_class, method_names
from flowmaps.oracle import ExactAverageVelocity
from flowmaps.samplers import ode_nfe, sample_consistency, sample_flow_map, sample_ode
from flowmaps.schedules import Schedule, get_schedule

FLOOR = "exact samples (floor)"
FLOW_MAP = "flow map"
CONSISTENCY = "consistency"
EXACT_ODE = "exact velocity"
TRAINING = "training"


@dataclass
class Row:
    """One measurement: ``metric`` of ``method``'s ``sampler`` at ``nfe`` on ``dataset`` for ``seed``."""

    dataset: str
    method: str
    sampler: str
    nfe: Optional[int]
    seed: int
    metric: str
    value: float


@dataclass
class BenchResult:
    """All rows, the notes (skips, failures), and the seed-0 samples for the sample grids."""

    config: BenchConfig
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    panels: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    seconds: float = 0.0


def ode_label(solver: str) -> str:
    return f"ODE {solver}"


def resolve_methods(cfg: BenchConfig) -> list[str]:
    """``cfg.methods``, or every registered method; unknown names are an error naming the valid ones."""
    names = method_names() if cfg.methods is None else list(cfg.methods)
    for name in names:
        get_method_class(name)  # raises ValueError listing the available methods
    return names


def train_config(cfg: BenchConfig, dataset: str, method: str, seed: int, teacher: Optional[str]) -> dict:
    """The ``flowmaps train`` config of one run: the shared budget, the method with its defaults."""
    values = {
        "data": {"name": dataset},
        "method": {"name": method},
        "model": {"width": cfg.width, "depth": cfg.depth},
        "optim": {"lr": cfg.lr, "ema_decay": cfg.ema_decay, "warmup_steps": min(200, cfg.steps // 10)},
        "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "seed": seed, "device": cfg.device,
                  "log_every": max(1, cfg.steps // 20)},
    }
    if teacher is not None:
        values["teacher"] = teacher
    return values


class _Measure:
    """Metrics of sample sets against one dataset's reference samples for one seed."""

    def __init__(self, result: BenchResult, data: DataSource, seed: int, reference: torch.Tensor):
        self.result, self.data, self.seed, self.reference = result, data, seed, reference

    def samples(self, method: str, sampler: str, nfe: Optional[int], x: torch.Tensor) -> None:
        for name, value in sample_metrics(x.cpu(), self.reference, self.data.name).items():
            self.result.rows.append(Row(self.data.name, method, sampler, nfe, self.seed, name, value))

    def scalar(self, method: str, sampler: str, metric: str, value: float) -> None:
        self.result.rows.append(Row(self.data.name, method, sampler, None, self.seed, metric, value))


def _step_label(k: int) -> str:
    return f"{k} step{'s' if k > 1 else ''}"


def _trained_pairs(reference: metrics.FlowMapReference, multistep: str) -> metrics.FlowMapReference:
    """The reference pairs a method trains: all (flow maps), ``t = 0`` (consistency), ``s = 1`` (one-step)."""
    keep = {"flow_map": lambda s, t: True, "consistency": lambda s, t: t == 0.0,
            "one_step": lambda s, t: s == 1.0}[multistep]
    chosen = [i for i, (s, t) in enumerate(reference.pairs) if keep(s, t)]
    return metrics.FlowMapReference([reference.pairs[i] for i in chosen], [reference.x_s[i] for i in chosen],
                                    [reference.exact[i] for i in chosen])


@torch.no_grad()
def _sample_model(
    cfg: BenchConfig, model: FlowMap, method: str, measure: _Measure, noise: torch.Tensor,
    multistep: Optional[str], ode: bool, panels: Optional[dict[str, torch.Tensor]], schedule: Schedule, seed: int,
) -> None:
    """Samples of ``model`` with the method's own multistep sampler (``None``: none) and the ODE baseline."""
    counter = metrics.NFECounter(model)
    if multistep is not None:
        for k in [1] if multistep == "one_step" else cfg.nfe:
            counter.reset()
            if multistep == "consistency":
                gen = torch.Generator(device=noise.device).manual_seed(7919 * (seed + 1) + k)
                x = sample_consistency(counter, noise, k, schedule, generator=gen)
            else:
                x = sample_flow_map(counter, noise, k)
            measure.samples(method, CONSISTENCY if multistep == "consistency" else FLOW_MAP, counter.calls, x)
            if panels is not None:
                panels[_step_label(k)] = x.cpu()
    if ode:
        for k in cfg.ode_steps:
            counter.reset()
            x = sample_ode(counter, noise, k, cfg.ode_solver)
            measure.samples(method, ode_label(cfg.ode_solver), counter.calls, x)
            if panels is not None and k == max(cfg.ode_steps):
                panels[f"ODE {counter.calls} NFE"] = x.cpu()


def run_bench(
    cfg: BenchConfig, out_dir: Path, log: Callable[[str], None] = print
) -> BenchResult:
    """Run the benchmark ``cfg`` describes; training runs are kept under ``out_dir/runs``."""
    from flowmaps.runs import load
    from flowmaps.train.config import config_from_dict
    from flowmaps.train.loop import train

    start = time.perf_counter()
    out_dir = Path(out_dir)
    methods = resolve_methods(cfg)
    result = BenchResult(cfg)
    device = torch.device(cfg.device)
    for dataset in cfg.datasets:
        data = get_data(dataset)
        runnable = []
        for method in methods:
            if get_method_class(method).needs_teacher and data.mixture is None:
                result.notes.append(f"{method} on {data.name}: skipped (distils a teacher; --teacher exact "
                                    "needs Gaussian-mixture data)")
            else:
                runnable.append(method)
        result.panels[data.name] = {}
        for seed in cfg.seeds:
            gen = torch.Generator(device=device).manual_seed(10_007 * (seed + 1))
            reference = data.sample(cfg.n_samples, gen).cpu()
            measure = _Measure(result, data, seed, reference)
            measure.samples(FLOOR, FLOOR, None, data.sample(cfg.n_samples, gen))
            noise = torch.randn(cfg.n_samples, data.dim, generator=gen, device=device)
            fm_reference = None
            if data.mixture is not None:
                exact = FlowMap(ExactAverageVelocity(data.mixture))
                for k in cfg.ode_steps:
                    x = sample_ode(exact, noise.double(), k, cfg.ode_solver).float()
                    measure.samples(EXACT_ODE, ode_label(cfg.ode_solver), ode_nfe(k, cfg.ode_solver), x)
                fm_reference = metrics.flow_map_reference(
                    data.mixture, metrics.time_pair_grid(cfg.flow_map_error_points),
                    cfg.flow_map_error_samples, gen, device)
            if seed == cfg.seeds[0]:
                result.panels[data.name]["data"] = {"data": reference}
            for method in runnable:
                cls = get_method_class(method)
                teacher = "exact" if cls.needs_teacher else None
                run_dir = out_dir / "runs" / Path(data.name).stem / method / f"seed{seed}"
                log(f"bench: {method} on {data.name}, seed {seed} ({cfg.steps} steps, batch {cfg.batch_size})")
                try:
                    if run_dir.exists():  # the harness owns out_dir/runs: a rerun starts afresh
                        shutil.rmtree(run_dir)
                    run_cfg = config_from_dict(train_config(cfg, dataset, method, seed, teacher))
                    trained = train(run_cfg, run_dir, progress=False, evaluate_at_end=False)
                    model = load(run_dir, ema=True, device=device)
                    diagonal = cls.rule == "diagonal"
                    multistep = None if diagonal else getattr(cls, "multistep_sampler", "flow_map")
                    panels = result.panels[data.name].setdefault(method, {}) if seed == cfg.seeds[0] else None
                    measure.scalar(method, TRAINING, "train_seconds", trained.train_seconds)
                    _sample_model(cfg, model, method, measure, noise, multistep, diagonal or cfg.ode_scope == "all",
                                  panels, get_schedule(run_cfg.train.schedule), seed)
                    if fm_reference is not None and multistep is not None:
                        error = metrics.flow_map_error(model, _trained_pairs(fm_reference, multistep))
                        measure.scalar(method, FLOW_MAP, "flow_map_error", error.mean)
                        measure.scalar(method, FLOW_MAP, "flow_map_error_1_to_0", error.per_pair[(1.0, 0.0)])
                except Exception as err:  # noqa: BLE001 - one broken method must not stop the benchmark
                    last = traceback.extract_tb(err.__traceback__)[-1]
                    result.notes.append(f"{method} on {data.name} (seed {seed}): failed with {type(err).__name__}: "
                                        f"{err} [{Path(last.filename).name}:{last.lineno}]")
                    log(f"bench: {result.notes[-1]}")
    result.seconds = time.perf_counter() - start
    return result
