"""Self-contained HTML reports: one page per run (``report.html``) or per bench, images embedded.

A run's page shows what a person wants to look at first: the sample panels (data, the flow map at
every NFE, the ODE baseline), the metrics table with its floor rows, the loss curve of every term
from ``train_log.jsonl``, the timing, and the resolved config. A bench's page shows its table and
its figures. Everything is inlined (PNG as base64, CSS in the page), so the file can be mailed,
archived or opened offline. ``flowmaps report RUN`` and ``flowmaps report --bench DIR`` rebuild them.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Optional

from flowmaps.train.checkpoint import atomic_write

REPORT_FILE = "report.html"

_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1180px;
       color: #1d1d1f; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th { background: #f4f4f6; } td:first-child, th:first-child { text-align: left; }
tr.floor td { color: #666; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f9; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.facts span { display: inline-block; margin-right: 2em; }
"""


def _page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(name)}</h2>\n{content}\n" for name, content in sections)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p class='sub'>{html.escape(subtitle)}</p>\n{body}</body></html>\n")


def _image(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _table(header: list[str], rows: list[list[str]], classes: Optional[list[str]] = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for i, row in enumerate(rows):
        cls = f" class='{classes[i]}'" if classes and classes[i] else ""
        lines.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def metrics_section(samplers: dict[str, dict[str, Any]]) -> str:
    """The metrics table of ``metrics.json``: one row per sampler, the floor and noise rows marked; for
    class-conditional samples a second table of the class accuracy of each class."""
    columns = sorted({k for row in samplers.values() for k, v in row.items() if k != "nfe" and not isinstance(v, dict)})
    rows = [[name, _number(row.get("nfe", "")), *(_number(row[c]) if c in row else "" for c in columns)]
            for name, row in samplers.items()]
    classes = ["floor" if name.startswith(("floor", "noise")) else "" for name in samplers]
    table = _table(["sampler", "NFE", *columns], rows, classes)
    per_class = {name: row["class_accuracy_per_class"] for name, row in samplers.items()
                 if isinstance(row.get("class_accuracy_per_class"), dict)}
    if not per_class:
        return table
    labels = sorted({k for accuracies in per_class.values() for k in accuracies}, key=lambda k: int(k))
    rows = [[name, *(_number(accuracies[k]) if k in accuracies else "" for k in labels)]
            for name, accuracies in per_class.items()]
    marks = ["floor" if name.startswith(("floor", "noise")) else "" for name in per_class]
    return f"{table}<h3>Class accuracy per class</h3>{_table(['sampler', *map(str, labels)], rows, marks)}"


def loss_curves(records: list[dict[str, Any]]) -> Optional[bytes]:
    """A PNG of the total loss and every ``loss/<term>`` over the steps (log scale), or ``None``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r and "event" not in r]
    if not steps:
        return None
    keys = ["loss"] + sorted({k for r in steps for k in r if k.startswith("loss/")})
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for key in keys:
        points = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if points:
            ax.plot(*zip(*points), label=key.replace("loss/", "") if key != "loss" else "total", lw=1.4 if key == "loss" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _read_log(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill ends the usable log
    return records


def run_report(run_dir: Path) -> str:
    """The HTML page of a run directory (``config.yaml``, ``metrics.json``, ``train_log.jsonl``, ``samples.png``)."""
    run_dir = Path(run_dir)
    config_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a flowmaps run directory (no config.yaml)")
    summary = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    records = _read_log(run_dir / "train_log.jsonl")
    sections: list[tuple[str, str]] = []
    if (run_dir / "samples.png").is_file():
        sections.append(("Samples", _image((run_dir / "samples.png").read_bytes(), "samples at each NFE")))
    if summary.get("samplers"):
        sections.append(("Metrics", metrics_section(summary["samplers"])
                         + "<p class='sub'>Italic rows: the floor (two independent data samples) and pure noise."
                           " Energy distance and MMD compare with fresh data samples; hist_kl is the "
                           "checkerboard's 50 x 50 histogram KL under the exact-bin and midpoint estimators.</p>"))
    curves = loss_curves(records)
    if curves is not None:
        last_step = next(r for r in reversed(records) if "loss" in r and "event" not in r)
        terms = [[k.replace("loss/", ""), _number(v)] for k, v in last_step.items() if k == "loss" or k.startswith("loss/")]
        sections.append(("Loss per term", _image(curves, "training loss of each term")
                         + f"<p class='sub'>At the last logged step ({last_step['step']}):</p>"
                         + _table(["term", "loss"], terms)))
    last = next((r for r in reversed(records) if "elapsed_s" in r), None)
    facts = {"method": summary.get("method"), "data": summary.get("data"), "steps": summary.get("steps"),
             "training time (s)": summary.get("train_seconds")}
    if last is not None and last.get("elapsed_s"):
        facts["steps per second"] = round((last["step"] + 1) / last["elapsed_s"], 1)
    events = [r for r in records if "event" in r]
    if events:
        facts["guard events"] = len(events)
    sections.append(("Timing", "<p class='facts'>" + "".join(
        f"<span><b>{html.escape(k)}</b>: {html.escape(_number(v))}</span>" for k, v in facts.items() if v is not None)
        + "</p>"))
    sections.append(("Resolved config", f"<pre>{html.escape(config_file.read_text())}</pre>"))
    title = f"{summary.get('method', 'flowmaps')} on {summary.get('data', run_dir.name)}"
    return _page(title, f"flowmaps run {run_dir}", sections)


def bench_report(bench_dir: Path) -> str:
    """The HTML page of a ``flowmaps bench`` directory (``table.md`` and its figures)."""
    bench_dir = Path(bench_dir)
    table = bench_dir / "table.md"
    if not table.is_file():
        raise FileNotFoundError(f"{bench_dir} is not a flowmaps bench directory (no table.md)")
    sections = [("Table", f"<pre>{html.escape(table.read_text())}</pre>")]
    for png in sorted(bench_dir.glob("*.png")):
        sections.append((png.stem.replace("_", " "), _image(png.read_bytes(), png.stem)))
    return _page("flowmaps bench", f"bench directory {bench_dir}", sections)


def write_report(directory: Path, bench: bool = False) -> Path:
    """Write ``report.html`` into a run (or, with ``bench``, a bench) directory, atomically; returns its path."""
    page = bench_report(directory) if bench else run_report(directory)
    path = Path(directory) / REPORT_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(page))
    return path


__all__ = ["REPORT_FILE", "run_report", "bench_report", "write_report", "loss_curves", "metrics_section"]
