"""One training process per run directory: an exclusive lock file, ``RUN_DIR/run.lock``.

``RunLock(run_dir).acquire()`` opens ``run.lock`` and takes an exclusive ``flock`` on it, then writes
its holder into it (PID, host, start time). The kernel drops the ``flock`` when the process ends in any
way, SIGKILL and the OOM killer included, so the lock is held for exactly the life of the process;
``release()`` (or leaving the ``with`` block) also deletes the file.

A second process that finds the ``flock`` held raises ``RunLockedError`` naming the holder. A lock
file whose ``flock`` is free was left by a process that died without deleting it (a stale lock): it
is taken over with a warning naming the dead holder. The recorded holder is checked as well, for file
systems that do not enforce ``flock``: a live PID on this host still holds the directory
(``RunLockedError``); a holder on another host cannot be checked from here, so its lock is taken over
with a warning that names it and says so (with working network locks, as NFS v4 has, a free ``flock``
means that process has ended).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from flowmaps.files import default_mode
from flowmaps.train.rundir import LOCK_FILE, RunDirectoryError

_HOLDER_LIMIT = 4096  # bytes of holder information read back


class RunLockedError(RunDirectoryError):
    """Another live process holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    when = holder.get("started")
    since = ""
    if isinstance(when, (int, float)):
        since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}"
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


class RunLock:
    """The lock of one run directory (see the module docstring); ``warn`` receives the stale-lock notice."""

    def __init__(self, run_dir: Union[str, Path], warn: Optional[Callable[[str], None]] = None):
        self.path = Path(run_dir) / LOCK_FILE
        self.warn = warn or logging.getLogger("flowmaps.train").warning
        self.fd: Optional[int] = None

    def _read_holder(self, fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, _HOLDER_LIMIT)
        try:
            holder = json.loads(raw.decode()) if raw else {}
        except (UnicodeDecodeError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> "RunLock":
        """Take the lock or raise ``RunLockedError``; ``OSError`` when the file cannot be created."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is in use by another flowmaps process ({_describe(holder)}; lock "
                    f"{self.path}): wait for it to end, or use another --out") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder deleted the file between our open and our flock: take the new one
        try:
            self._check_previous_holder(fd)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _check_previous_holder(self, fd: int) -> None:
        """Warn about a stale lock taken over; refuse one whose holder is alive (``flock`` not enforced)."""
        holder = self._read_holder(fd)
        if not holder:
            return
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            raise RunLockedError(
                f"{self.path.parent} is in use by another flowmaps process ({_describe(holder)}; lock {self.path}; "
                "this file system does not enforce the lock, the holder is alive): wait for it to end, or use "
                "another --out")
        if host != socket.gethostname():
            self.warn(f"taking over the lock {self.path} of {_describe(holder)}: its lock is free, so that process has "
                      "ended (if it is still running there, stop this one: this file system does not enforce locks)")
        else:
            self.warn(f"taking over the stale lock {self.path} of {_describe(holder)} (that process has ended)")

    def release(self) -> None:
        """Delete the lock file and drop the lock (a no-op when not held)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


__all__ = ["RunLock", "RunLockedError"]
