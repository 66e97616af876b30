"""Memory limits checked before allocating: a request that cannot fit is a named error, not a crash.

``check_fits(nbytes, device, what)`` compares an estimate of what an operation will allocate with the
memory the device has available now (``MemAvailable`` of ``/proc/meminfo`` on the CPU, else the free
physical pages; ``torch.cuda.mem_get_info`` on a GPU) and raises ``MemoryLimitError`` naming the
request when it is larger. The estimates are lower bounds of the real need, so a refusal is certain
to be right, and an allocation that fails anyway is reported by ``out_of_memory`` the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch


class MemoryLimitError(ValueError):
    """An operation needs more memory than its device has available."""


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory available for new allocations on ``device`` now, or ``None`` when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _size(nbytes: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def check_fits(nbytes: float, device: torch.device, what: str) -> None:
    """``MemoryLimitError`` when ``nbytes`` (an estimate for ``what``) exceed the memory available on ``device``."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise MemoryLimitError(f"{what} needs at least {_size(nbytes)} of memory on {device}, but only {_size(free)} "
                               "are available")


def out_of_memory(err: BaseException, what: str, device: torch.device) -> MemoryLimitError:
    """A failed allocation (``MemoryError``, ``torch.OutOfMemoryError``) for ``what`` as a named error."""
    cause = str(err).splitlines()[0] if str(err) else type(err).__name__
    return MemoryLimitError(f"{what} ran out of memory on {device}: {cause}")


__all__ = ["MemoryLimitError", "available_bytes", "check_fits", "out_of_memory"]
