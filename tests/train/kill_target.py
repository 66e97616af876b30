"""``flowmaps`` CLI in a child process that can pause inside a checkpoint write (for the SIGKILL test).

With ``FLOWMAPS_TEST_PAUSE_AT=k`` the k-th file written into a checkpoint (0-based, four per
checkpoint: weights, EMA weights, state, manifest) is written half, then the process prints
``PAUSED <path>`` and sleeps until it is killed.
"""

import os
import sys
import time

import torch

import flowmaps.train.checkpoint as checkpoint
from flowmaps.cli import main

torch.set_num_threads(1)
PAUSE_AT = int(os.environ.get("FLOWMAPS_TEST_PAUSE_AT", "-1"))
_written = 0
_write_bytes = checkpoint._write_bytes


def _pausing_write(path, data):
    global _written
    if _written == PAUSE_AT:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        print(f"PAUSED {path}", flush=True)
        time.sleep(600)
    _written += 1
    _write_bytes(path, data)


checkpoint._write_bytes = _pausing_write
sys.exit(main(sys.argv[1:]))
