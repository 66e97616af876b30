"""Reports a person looks at: a self-contained ``report.html`` per run or bench (``html``)."""

from flowmaps.report.html import REPORT_FILE, bench_report, run_report, write_report

__all__ = ["REPORT_FILE", "run_report", "bench_report", "write_report"]
