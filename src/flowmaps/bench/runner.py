"""Train every method on every dataset with an equal budget and measure it against exact samples.

For each dataset and seed the runner draws one set of exact reference samples, a second exact
set (the metrics' floor), and one set of noise shared by every sampler; for mixture data it also
solves the exact flow map once (``flowmaps.metrics.flow_map_reference``) and runs the ODE sampler
on the exact velocity (the discretisation error alone). Then, per method, it trains through
``flowmaps.train.loop.train`` and measures the EMA model:

- the method's own sampler (``Method.sampler``, ``flowmaps.samplers``) at each step count in
  ``cfg.nfe`` it supports: the flow map ``F`` composed over a uniform grid, or, for maps trained
  only towards ``t = 0`` (``consistency``), consistency multistep sampling (jump to data, re-noise),
  or, for maps trained only from ``s = 1`` (``one_step``), one step alone; ``diagonal`` methods
  such as ``fm`` get none (their off-diagonal is never trained);
- the diagonal ODE sampler at each of ``cfg.ode_steps`` (flow matching, or every method with
  ``ode_scope="all"``);
- the flow-map error over a grid of ``(s, t)`` pairs (mixture data, non-diagonal methods;
  restricted to the pairs the method trains: ``t = 0`` for consistency maps, ``s = 1`` for
  one-step maps);
- the compositional-rule residual ``F(F(x_s, s, u), u, t)`` against ``F(x_s, s, t)`` on real data
  (``flowmaps.diagnostics.composition_error``, relative to the jump's size), for two-time maps only
  (maps trained only towards ``t = 0`` or only from ``s = 1`` are never trained at the inner
  times, so the rule says nothing about them).

The (method, seed) runs are independent; ``run_bench(..., jobs=N)`` runs N of them at once in
worker processes.

Each measurement is one ``Row``; ``flowmaps.bench.report`` aggregates and writes them. A method
that needs a teacher runs with ``--teacher exact`` on mixture data and is skipped with a note on
other data; a method initialised from a pretrained network (ECT) starts from the benchmark's own
``fm`` run of the same seed, after all other runs; a method that fails is recorded with its error
and the run goes on.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from flowmaps import metrics
from flowmaps.bench.config import BenchConfig
from flowmaps.data import DataSource, get_data
from flowmaps.diagnostics import composition_error
from flowmaps.evaluation import sample_metrics
from flowmaps.files import write_json
from flowmaps.flow_map import FlowMap
from flowmaps.methods import get_method_class, method_names
from flowmaps.oracle import ExactAverageVelocity
from flowmaps.samplers import Sampler, get_sampler, ode_nfe, sample_ode
from flowmaps.schedules import Schedule, get_schedule
from flowmaps.runs import load
from flowmaps.build import config_from_dict
from flowmaps.train.loop import LOG_FILE, train
from flowmaps.train.rundir import BENCH_OUTCOME_FILE, BENCH_PANELS_FILE

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

    def __init__(self, data: DataSource, seed: int, reference: torch.Tensor):
        self.data, self.seed, self.reference = data, seed, reference
        self.rows: list[Row] = []

    def samples(self, method: str, sampler: str, nfe: Optional[int], x: torch.Tensor) -> None:
        for name, value in sample_metrics(x.cpu(), self.reference, self.data.name).items():
            self.rows.append(Row(self.data.name, method, sampler, nfe, self.seed, name, value))

    def scalar(self, method: str, sampler: str, metric: str, value: float) -> None:
        self.rows.append(Row(self.data.name, method, sampler, None, self.seed, metric, value))


def _step_label(k: int) -> str:
    return f"{k} step{'s' if k > 1 else ''}"


@torch.no_grad()
def _sample_model(
    cfg: BenchConfig, model: FlowMap, method: str, measure: "_Measure", noise: torch.Tensor,
    sampler: Optional[Sampler], ode: bool, panels: Optional[dict[str, torch.Tensor]], schedule: Schedule, seed: int,
) -> None:
    """Samples of ``model`` with the method's own sampler (``None``: none) and the ODE baseline."""
    counter = metrics.NFECounter(model)
    if sampler is not None:
        for k in [k for k in cfg.nfe if sampler.max_steps is None or k <= sampler.max_steps]:
            counter.reset()
            gen = torch.Generator(device=noise.device).manual_seed(7919 * (seed + 1) + k)
            x = sampler.sample(counter, noise, k, schedule=schedule, generator=gen)
            measure.samples(method, CONSISTENCY if sampler.name == "consistency" else FLOW_MAP, counter.calls, x)
            if panels is not None:
                panels[_step_label(k)] = x.cpu()
    if ode:
        for k in cfg.ode_steps:
            counter.reset()
            x = sample_ode(counter, noise, k, cfg.ode_solver)
            measure.samples(method, ode_label(cfg.ode_solver), counter.calls, x)
            if panels is not None and k == max(cfg.ode_steps):
                panels[f"ODE {counter.calls} NFE"] = x.cpu()


@dataclass
class SeedContext:
    """What every method of one (dataset, seed) is measured against: exact reference samples, the
    shared noise, the exact flow map's jumps (mixtures) and the rows of the floor and exact ODE."""

    data: DataSource
    seed: int
    reference: torch.Tensor
    noise: torch.Tensor
    fm_reference: Optional[metrics.FlowMapReference]
    rows: list[Row]


def seed_context(cfg: BenchConfig, dataset: str, seed: int) -> SeedContext:
    """Draw the seed's reference, floor set and noise, and solve the exact references; deterministic in
    ``(cfg, dataset, seed)``, so worker processes rebuild exactly what the parent measures against."""
    device = torch.device(cfg.device)
    data = get_data(dataset)
    gen = torch.Generator(device=device).manual_seed(10_007 * (seed + 1))
    reference = data.sample(cfg.n_samples, gen).x0.cpu()
    measure = _Measure(data, seed, reference)
    measure.samples(FLOOR, FLOOR, None, data.sample(cfg.n_samples, gen).x0)
    noise = torch.randn(cfg.n_samples, data.dim, generator=gen, device=device)
    fm_reference = None
    if data.mixture is not None:
        exact = FlowMap(ExactAverageVelocity(data.mixture))
        for k in cfg.ode_steps:
            x = sample_ode(exact, noise.double(), k, cfg.ode_solver).float()
            measure.samples(EXACT_ODE, ode_label(cfg.ode_solver), ode_nfe(k, cfg.ode_solver), x)
        fm_reference = metrics.flow_map_reference(
            data.mixture, metrics.time_pair_grid(cfg.flow_map_error_points), cfg.flow_map_error_samples, gen, device)
    return SeedContext(data, seed, reference, noise, fm_reference, measure.rows)


_CONTEXTS: dict[tuple[str, str, int], SeedContext] = {}


def _cached_context(cfg: BenchConfig, dataset: str, seed: int) -> SeedContext:
    key = (json.dumps(cfg.to_dict(), sort_keys=True), dataset, seed)
    if key not in _CONTEXTS:  # small (the reference and noise sets): kept for the whole process
        _CONTEXTS[key] = seed_context(cfg, dataset, seed)
    return _CONTEXTS[key]


@dataclass
class MethodOutcome:
    """The rows of one (dataset, method, seed) run, a note if it failed, its seed-0 sample panels."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    panels: Optional[dict[str, torch.Tensor]] = None


def run_method(cfg: BenchConfig, dataset: str, method: str, seed: int, out_dir: Path) -> MethodOutcome:
    """Train ``method`` on ``dataset`` with ``seed`` under the shared budget and measure its EMA model:
    its multistep sampler at every NFE, the ODE baseline (``fm``, or all with ``ode_scope="all"``), the
    flow-map error (mixtures) and the compositional-rule residual (two-time maps)."""
    run_dir = Path(out_dir) / "runs" / Path(get_data(dataset).name).stem / method / f"seed{seed}"
    settings = _measurement_settings(cfg)
    finished = _load_outcome(run_dir, settings)
    if finished is not None:
        finished.rows += _stability_rows(run_dir, get_data(dataset).name, method, seed)
        return finished
    ctx = _cached_context(cfg, dataset, seed)
    device = torch.device(cfg.device)
    cls = get_method_class(method)
    teacher = _teacher_of(cls, run_dir) if cls.needs_teacher else None
    measure = _Measure(ctx.data, seed, ctx.reference)
    outcome = MethodOutcome(rows=measure.rows)
    try:
        if run_dir.exists():  # an unfinished or differently configured run: start afresh
            shutil.rmtree(run_dir)
        run_cfg = config_from_dict(train_config(cfg, dataset, method, seed, teacher))
        trained = train(run_cfg, run_dir, progress=False, evaluate_at_end=False)
        model = load(run_dir, ema=True, device=device)
        schedule = get_schedule(run_cfg.train.schedule)
        diagonal = cls.rule == "diagonal"
        sampler = None if diagonal else get_sampler(cls.sampler)
        panels = {} if seed == cfg.seeds[0] else None
        measure.scalar(method, TRAINING, "train_seconds", trained.train_seconds)
        _sample_model(cfg, model, method, measure, ctx.noise, sampler, diagonal or cfg.ode_scope == "all",
                      panels, schedule, seed)
        if ctx.fm_reference is not None and sampler is not None:
            error = metrics.flow_map_error(model, ctx.fm_reference.only(sampler.trained))
            measure.scalar(method, FLOW_MAP, "flow_map_error", error.mean)
            measure.scalar(method, FLOW_MAP, "flow_map_error_1_to_0", error.per_pair[(1.0, 0.0)])
        if sampler is not None and sampler.ode_baseline:
            gen = torch.Generator(device=device).manual_seed(7_919 * (seed + 1))
            comp = composition_error(model, ctx.reference[: cfg.flow_map_error_samples].to(device), schedule, gen)
            measure.scalar(method, FLOW_MAP, "composition_error", comp["relative"])
            measure.scalar(method, FLOW_MAP, "composition_error_noise_to_data", comp["relative_noise_to_data"])
        outcome.panels = panels
        _save_outcome(run_dir, settings, outcome)
        outcome.rows += _stability_rows(run_dir, ctx.data.name, method, seed)
    except Exception as err:  # noqa: BLE001 - one broken method must not stop the benchmark
        last = traceback.extract_tb(err.__traceback__)[-1]
        outcome.notes.append(f"{method} on {ctx.data.name} (seed {seed}): failed with {type(err).__name__}: "
                             f"{err} [{Path(last.filename).name}:{last.lineno}]")
    return outcome


def _stability_rows(run_dir: Path, dataset: str, method: str, seed: int) -> list[Row]:
    """How often the divergence guard acted during the run (``train_log.jsonl`` events): steps skipped
    for a non-finite loss or gradient, and rollbacks to a checkpoint. Read from the log each time, so
    reused runs report them too."""
    counts = {"nonfinite": 0, "rollback": 0}
    log_file = run_dir / LOG_FILE
    if log_file.is_file():
        for line in log_file.read_text().splitlines():
            event = json.loads(line).get("event") if '"event"' in line else None
            if event in counts:
                counts[event] += 1
    return [Row(dataset, method, TRAINING, None, seed, "nonfinite_steps", float(counts["nonfinite"])),
            Row(dataset, method, TRAINING, None, seed, "rollbacks", float(counts["rollback"]))]


def _teacher_of(cls: type, run_dir: Path) -> str:
    """The exact oracle, or for methods initialised from a trained network (ECT) the benchmark's own
    ``fm`` run of the same dataset and seed (a pretrained diffusion model of the same size)."""
    if getattr(cls, "initializes_from_teacher", False):
        return str(run_dir.parent.parent / "fm" / run_dir.name)
    return "exact"


OUTCOME_FILE = BENCH_OUTCOME_FILE  # beside the run's own files (flowmaps.train.rundir lists both as flowmaps')
PANELS_FILE = BENCH_PANELS_FILE


def _measurement_settings(cfg: BenchConfig) -> dict:
    """What a finished run's measurements depend on: everything but the lists of methods, seeds and
    datasets (a run is one method, seed and dataset)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("methods", "seeds", "datasets")}


def _save_outcome(run_dir: Path, settings: dict, outcome: MethodOutcome) -> None:
    """Record a finished run's rows (strict JSON: a non-finite value as ``"NaN"``/``"Infinity"``) and
    sample panels (safetensors) beside its weights, atomically, so that a rerun of the same benchmark
    reuses it."""
    from safetensors.torch import save_file

    if outcome.panels:
        save_file({k: v.contiguous() for k, v in outcome.panels.items()}, str(run_dir / PANELS_FILE))
    payload = {"settings": settings, "panels": outcome.panels is not None,
               "rows": [dataclasses.asdict(r) for r in outcome.rows]}
    write_json(run_dir / OUTCOME_FILE, payload, indent=None)


def _load_outcome(run_dir: Path, settings: dict) -> Optional[MethodOutcome]:
    """The recorded outcome of a finished run with the same settings, else ``None``."""
    from safetensors.torch import load_file

    path = run_dir / OUTCOME_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        if payload["settings"] != json.loads(json.dumps(settings)):
            return None
        panels = None
        if payload["panels"]:
            panels = load_file(str(run_dir / PANELS_FILE)) if (run_dir / PANELS_FILE).is_file() else {}
        return MethodOutcome(rows=[Row(**{**r, "value": float(r["value"])}) for r in payload["rows"]], panels=panels)
    except (ValueError, KeyError, TypeError, OSError):  # unreadable: measure again
        return None


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_bench(
    cfg: BenchConfig, out_dir: Path, log: Callable[[str], None] = print, jobs: int = 1
) -> BenchResult:
    """Run the benchmark ``cfg`` describes; training runs are kept under ``out_dir/runs``.

    ``jobs > 1`` trains that many (method, seed) runs at once in worker processes (spawned, one
    torch thread each); the rows are identical to a serial run's and come in the same order. A run
    that finished in an earlier invocation into the same ``out_dir`` with the same settings (its
    ``bench_outcome.json``) is reused, not retrained: an interrupted benchmark resumes where it
    stopped, possibly with another ``jobs``.
    """
    if jobs < 1:
        raise ValueError(f"bench: jobs must be at least 1; got {jobs}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"bench: --out {out_dir} is a file, not a results directory; choose another --out")
    methods = resolve_methods(cfg)
    result = BenchResult(cfg)
    tasks: list[tuple[str, str, int]] = []
    later: list[tuple[str, str, int]] = []  # methods initialised from the fm runs (ECT)
    for dataset in cfg.datasets:
        data = get_data(dataset)
        runnable = []
        for method in methods:
            if get_method_class(method).needs_teacher and data.mixture is None:
                result.notes.append(f"{method} on {data.name}: skipped (distils a teacher; --teacher exact "
                                    "needs Gaussian-mixture data)")
            else:
                runnable.append(method)
        initialized = [m for m in runnable if getattr(get_method_class(m), "initializes_from_teacher", False)]
        if initialized and "fm" not in runnable:
            result.notes.append(f"{', '.join(initialized)} on {data.name}: skipped (initialised from the benchmark's "
                                "own fm run: include fm in the methods)")
            runnable = [m for m in runnable if m not in initialized]
        result.panels[data.name] = {}
        for seed in cfg.seeds:
            ctx = _cached_context(cfg, dataset, seed)
            result.rows += ctx.rows
            if seed == cfg.seeds[0]:
                result.panels[data.name]["data"] = {"data": ctx.reference}
            tasks += [(dataset, method, seed) for method in runnable if method not in initialized]
            later += [(dataset, method, seed) for method in runnable if method in initialized]
    tasks += later  # after every fm run they start from

    def report(task: tuple[str, str, int], outcome: MethodOutcome, done: int) -> None:
        dataset, method, seed = task
        status = f"failed: {outcome.notes[0]}" if outcome.notes else "done"
        log(f"bench: [{done}/{len(tasks)}] {method} on {dataset}, seed {seed} {status} "
            f"({time.perf_counter() - start:.0f}s)")

    log(f"bench: {len(tasks)} runs of {cfg.steps} steps at batch {cfg.batch_size}, {jobs} at a time")
    outcomes: list[MethodOutcome] = []
    first_phase = len(tasks) - len(later)
    if jobs == 1:
        for task in tasks:
            outcomes.append(run_method(cfg, *task, out_dir))
            report(task, outcomes[-1], len(outcomes))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_one_thread) as pool:
            for phase in (range(first_phase), range(first_phase, len(tasks))):
                futures = {pool.submit(run_method, cfg, *tasks[i], out_dir): i for i in phase}
                finished: dict[int, MethodOutcome] = {}
                for future in as_completed(futures):
                    i = futures[future]
                    finished[i] = future.result()
                    report(tasks[i], finished[i], len(outcomes) + len(finished))
                outcomes += [finished[i] for i in phase]
    for (dataset, method, _), outcome in zip(tasks, outcomes):
        result.rows += outcome.rows
        result.notes += outcome.notes
        if outcome.panels is not None:
            result.panels[get_data(dataset).name][method] = outcome.panels
    result.seconds = time.perf_counter() - start
    return result
