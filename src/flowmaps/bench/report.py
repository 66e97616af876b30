"""Aggregate benchmark rows over seeds and write them: CSV, Markdown tables, plots.

Files written into the results directory:

- ``results.csv``: every measurement (dataset, method, sampler, nfe, seed, metric, value);
- ``summary.csv``: mean, sample standard deviation and count over seeds per
  (dataset, method, sampler, nfe, metric);
- ``table.md``: per dataset, the energy distance (and, on the checkerboard, the histogram KL)
  of every method and sampler by NFE as ``mean ± std``; per method the flow-map error (mixture
  data), the compositional-rule residual, training seconds and their ratio to ``fm``'s; and the
  notes (skipped or failed methods);
- ``quality_vs_nfe_<dataset>.png``: each metric against NFE (log-log), one line per method and
  sampler with the seeds' spread as error bars, the exact-sample floor as a dotted line;
- ``samples_<dataset>.png``: a grid of seed-0 samples, one row per method, one column per sampler;
- ``bench.json``: the configuration and the wall time of the run.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from flowmaps.bench.runner import EXACT_ODE, FLOOR, FLOW_MAP, BenchResult, Row
from flowmaps.report import write_report as write_html_report

TABLE_METRICS = ("energy_distance", "hist_kl", "hist_kl_midpoint")
PLOT_METRICS = ("energy_distance", "sliced_w2", "mmd", "hist_kl")
METRIC_TITLES = {
    "energy_distance": "energy distance",
    "sliced_w2": "sliced W2",
    "mmd": "MMD^2",
    "hist_kl": "histogram KL (50x50, exact-bin estimator)",
    "hist_kl_midpoint": "histogram KL (50x50, midpoint estimator)",
    "flow_map_error": "flow-map error",
    "composition_error": "composition error",
}


@dataclass
class Summary:
    """Seed statistics of one (dataset, method, sampler, nfe, metric)."""

    dataset: str
    method: str
    sampler: str
    nfe: Optional[int]
    metric: str
    mean: float
    std: float
    n: int


def summarise(rows: list[Row]) -> list[Summary]:
    """Mean and sample standard deviation (0 for one seed) over seeds, in first-seen order."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r.dataset, r.method, r.sampler, r.nfe, r.metric)].append(r.value)
    out = []
    for (dataset, method, sampler, nfe, metric), values in groups.items():
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out.append(Summary(dataset, method, sampler, nfe, metric, mean, math.sqrt(var), len(values)))
    return out


def format_cell(s: Summary) -> str:
    return f"{s.mean:.3g} ± {s.std:.2g}" if s.n > 1 else f"{s.mean:.3g}"


def _series_name(method: str, sampler: str) -> str:
    if method in (FLOOR, EXACT_ODE):
        return f"{method}, {sampler}" if method == EXACT_ODE else FLOOR
    return method if sampler == FLOW_MAP else f"{method}, {sampler}"


def markdown_tables(result: BenchResult, summaries: list[Summary]) -> str:
    """The Markdown report: per dataset and metric a table of samplers by NFE, then notes."""
    cfg = result.config
    lines = [
        f"Budget per method: {cfg.steps} steps at batch {cfg.batch_size}, MLP {cfg.width} x {cfg.depth}, "
        f"Adam lr {cfg.lr:g} (cosine), EMA {cfg.ema_decay}; seeds {cfg.seeds}; {cfg.n_samples} samples per "
        f"sampler. Cells are mean ± sample std over seeds. Flow map: `F` composed over a uniform grid; "
        f"consistency: jump to data and re-noise (maps trained only to `t = 0`); "
        f"ODE: {cfg.ode_solver} on the diagonal `V(x, t, t)`; exact velocity: the same ODE sampler on the "
        f"exact velocity (mixture data); floor: two sets of exact samples.",
        "",
    ]
    by_dataset: dict[str, list[Summary]] = defaultdict(list)
    for s in summaries:
        by_dataset[s.dataset].append(s)
    for dataset, items in by_dataset.items():
        nfes = sorted({s.nfe for s in items if s.nfe is not None})
        for metric in TABLE_METRICS:
            cells = [s for s in items if s.metric == metric]
            if not cells:
                continue
            lines += [f"### {dataset}: {METRIC_TITLES[metric]} (lower is better)", ""]
            lines.append("| method | sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
            lines.append("|---|---|" + "---|" * len(nfes))
            series: dict[tuple[str, str], dict[Optional[int], Summary]] = defaultdict(dict)
            for s in cells:
                series[(s.method, s.sampler)][s.nfe] = s
            for (method, sampler), by_nfe in series.items():
                if method == FLOOR:
                    row = [format_cell(by_nfe[None])] * len(nfes)
                    lines.append(f"| {FLOOR} | | " + " | ".join(row) + " |")
                    continue
                row = [format_cell(by_nfe[k]) if k in by_nfe else "" for k in nfes]
                lines.append(f"| {method} | {sampler} | " + " | ".join(row) + " |")
            lines.append("")
        lines += _per_method_table(dataset, items, cfg.flow_map_error_points)
    if result.notes:
        lines += ["### Notes", ""] + [f"- {note}" for note in result.notes] + [""]
    return "\n".join(lines)


PER_METHOD_COLUMNS = (
    ("flow_map_error", "flow-map error (grid)"),
    ("flow_map_error_1_to_0", "flow-map error (1 -> 0)"),
    ("composition_error", "composition error (s > u > t)"),
    ("composition_error_noise_to_data", "composition error (1 > u > 0)"),
    ("train_seconds", "training seconds"),
    ("nonfinite_steps", "non-finite steps skipped"),
    ("rollbacks", "rollbacks"),
)


def _per_method_table(dataset: str, items: list[Summary], grid_points: int) -> list[str]:
    """Per method: flow-map error (mixtures), compositional-rule residual (two-time maps), training
    seconds and their ratio to ``fm``'s; columns without any value are left out."""
    cells = {(s.method, s.metric): s for s in items if s.metric in dict(PER_METHOD_COLUMNS)}
    if not cells:
        return []
    columns = [(metric, title) for metric, title in PER_METHOD_COLUMNS if any(m == metric for _, m in cells)]
    methods = list(dict.fromkeys(method for method, _ in cells))
    fm_seconds = cells.get(("fm", "train_seconds"))
    lines = [f"### {dataset}: flow-map error, composition error and training time", ""]
    if any(metric == "flow_map_error" for metric, _ in columns):
        lines.append("Flow-map error `E|F_model - F_exact|^2 / E|F_exact - x_s|^2` at exact samples `x_s`, mean over "
                     f"the {grid_points}-point grid of pairs `s > t` (for maps trained only to `t = 0` or only from "
                     "`s = 1`: over those pairs) and at `(1, 0)` (0: exact map; 1: the identity).")
    else:
        lines.append("(No exact flow map for this data: not a Gaussian mixture.)")
    lines += ["Composition error `E|F(F(x_s, s, u), u, t) - F(x_s, s, t)|^2 / E|F(x_s, s, t) - x_s|^2` on data "
              "paths, `s > u > t` uniform, and for `s = 1, t = 0` (one step against two); two-time maps only "
              "(0 for any exact flow map).", ""]
    header = [title for _, title in columns] + (["training time / fm"] if fm_seconds is not None else [])
    lines += ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for method in methods:
        row = [format_cell(cells[(method, metric)]) if (method, metric) in cells else "" for metric, _ in columns]
        if fm_seconds is not None:
            own = cells.get((method, "train_seconds"))
            row.append(f"{own.mean / fm_seconds.mean:.2f}" if own is not None and fm_seconds.mean > 0 else "")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def plot_quality_vs_nfe(summaries: list[Summary], dataset: str, path: Path) -> None:
    """One panel per metric: value against NFE (log-log; MMD² symlog, it can be negative) per
    series, error bars = seed std, the exact-sample floor dotted; ODE samplers dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [s for s in summaries if s.dataset == dataset]
    present = [m for m in PLOT_METRICS if any(s.metric == m for s in items)]
    names = list(dict.fromkeys(_series_name(s.method, s.sampler) for s in items if s.metric in present))
    names = [n for n in names if n != FLOOR]
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    markers = "osD^v<>phX*"
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), max(3.8, 0.22 * len(names) + 1)),
                             squeeze=False)
    for ax, metric in zip(axes[0], present):
        series: dict[str, list[Summary]] = defaultdict(list)
        for s in items:
            if s.metric == metric:
                series[_series_name(s.method, s.sampler)].append(s)
        for name, points in series.items():
            if name == FLOOR:
                ax.axhline(points[0].mean, color="gray", linestyle=":", label=FLOOR)
                continue
            points = sorted((p for p in points if p.nfe is not None), key=lambda p: p.nfe)
            i = names.index(name)
            ax.errorbar([p.nfe for p in points], [p.mean for p in points], yerr=[p.std for p in points],
                        color=colors[name], marker=markers[(i // 20) % len(markers)], markersize=3,
                        linestyle="--" if "ODE" in name else "-", capsize=2, label=name)
        ax.set_xscale("log", base=2)
        if metric == "mmd":
            ax.set_yscale("symlog", linthresh=1e-4)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(f"{dataset}: {METRIC_TITLES[metric]}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_sample_grid(panels: dict[str, dict[str, torch.Tensor]], path: Path, title: str = "", limit: float = 1.6) -> None:
    """A grid of 2D histograms (first two coordinates): one row per method, its samplers left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, p) for name, p in panels.items() if p]
    width = max(len(p) for _, p in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(1.9 * width, 2.0 * len(rows)), squeeze=False)
    for i, (method, row) in enumerate(rows):
        for j in range(width):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            if j >= len(row):
                ax.axis("off")
                continue
            col, x = list(row.items())[j]
            x = x.reshape(x.shape[0], -1).float().numpy()
            y = x[:, 1] if x.shape[1] > 1 else 0 * x[:, 0]
            ax.hist2d(x[:, 0], y, bins=100, range=[[-limit, limit], [-limit, limit]], cmap="magma")
            ax.set_title(col if col == method else f"{method}: {col}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(result: BenchResult, out_dir: Path) -> str:
    """Write every file of the module docstring into ``out_dir``; return the Markdown report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["dataset", "method", "sampler", "nfe", "seed", "metric", "value"]
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in result.rows:
            writer.writerow({**asdict(r), "nfe": "" if r.nfe is None else r.nfe})
    summaries = summarise(result.rows)
    with (out_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dataset", "method", "sampler", "nfe", "metric", "mean", "std", "n"])
        writer.writeheader()
        for s in summaries:
            writer.writerow({**asdict(s), "nfe": "" if s.nfe is None else s.nfe})
    text = markdown_tables(result, summaries)
    (out_dir / "table.md").write_text(text + "\n")
    for dataset in dict.fromkeys(s.dataset for s in summaries):
        stem = Path(dataset).stem
        plot_quality_vs_nfe(summaries, dataset, out_dir / f"quality_vs_nfe_{stem}.png")
        if dataset in result.panels:
            grid = {"data": result.panels[dataset].get("data", {})}
            grid.update({m: p for m, p in result.panels[dataset].items() if m != "data"})
            plot_sample_grid(grid, out_dir / f"samples_{stem}.png", title=f"{dataset}, seed {result.config.seeds[0]}")
    (out_dir / "bench.json").write_text(json.dumps({"config": result.config.to_dict(), "seconds": round(result.seconds, 1),
                                                    "notes": result.notes}, indent=2))
    write_html_report(out_dir, bench=True)
    return text
