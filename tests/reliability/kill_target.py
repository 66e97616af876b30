"""``flowmaps`` CLI in a child process whose file writes are numbered and can pause (for SIGKILL tests).

Every write into a run directory is counted, in order: the atomic writes of ``flowmaps.files``
(status, config, data info, log, final weights, manifest, metrics, samples, report) and the files of
each checkpoint. With ``FLOWMAPS_TEST_LIST_WRITES=1`` the child prints ``WRITE <index> <path>`` before
each; with ``FLOWMAPS_TEST_PAUSE_AT=k`` the k-th write (0-based) is written half, then the child prints
``PAUSED <path>`` and sleeps until it is killed.
"""

import os
import sys
import time
from pathlib import Path

import torch

import flowmaps.files as files
import flowmaps.plots  # noqa: F401 - imported so that their ``atomic_write`` can be replaced below
import flowmaps.report.html  # noqa: F401
import flowmaps.train.checkpoint as checkpoint
import flowmaps.train.loop  # noqa: F401
from flowmaps.cli import main

torch.set_num_threads(1)
PAUSE_AT = int(os.environ.get("FLOWMAPS_TEST_PAUSE_AT", "-1"))
LIST = os.environ.get("FLOWMAPS_TEST_LIST_WRITES") == "1"
_count = 0
_atomic_write = files.atomic_write
_write_bytes = checkpoint._write_bytes


def _next(path) -> bool:
    """Number this write; whether it is the one to pause in."""
    global _count
    index, _count = _count, _count + 1
    if LIST:
        print(f"WRITE {index} {path}", flush=True)
    return index == PAUSE_AT


def _pause(path) -> None:
    print(f"PAUSED {path}", flush=True)
    time.sleep(600)


def counted_atomic_write(path, write):
    if not _next(path):
        return _atomic_write(path, write)

    def half(tmp):
        write(tmp)
        data = Path(tmp).read_bytes()
        Path(tmp).write_bytes(data[: len(data) // 2])
        _pause(path)

    return _atomic_write(path, half)


def counted_write_bytes(path, data):
    if _next(path):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        _pause(path)
    _write_bytes(path, data)


for module in list(sys.modules.values()):
    name = getattr(module, "__name__", "")
    if name.startswith("flowmaps") and getattr(module, "atomic_write", None) is _atomic_write:
        module.atomic_write = counted_atomic_write
checkpoint._write_bytes = counted_write_bytes
sys.exit(main(sys.argv[1:]))
