"""The benchmark harness behind ``flowmaps bench``: every registered method trained with an equal
budget and measured against exact samples (and, on Gaussian mixtures, the exact flow map).

``run_bench(cfg, out_dir)`` trains and measures; ``write_report(result, out_dir)`` writes the CSV
files, the Markdown tables and the plots; ``sampling_throughput`` times the samplers per NFE.
"""

from flowmaps.bench.config import FULL, QUICK, BenchConfig
from flowmaps.bench.report import summarise, write_report
from flowmaps.bench.runner import BenchResult, Row, run_bench
from flowmaps.bench.throughput import sampling_throughput

__all__ = ["BenchConfig", "FULL", "QUICK", "BenchResult", "Row", "run_bench", "summarise", "write_report",
           "sampling_throughput"]
