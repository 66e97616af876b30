"""Files on disk: written atomically with the umask's permissions, read within a size limit, strict
JSON, and failed writes as errors that name the path and the free space.

- ``atomic_write(path, write)`` writes a temporary file beside ``path``, fsyncs it and renames it over
  ``path``: a reader sees the old file or the new one, never a part. The temporary file is created
  private (``mkstemp``) and given ``0o666 & ~umask`` before the rename, the permissions ``open`` gives
  every other file, so weights, configs and logs of a run share one mode.
- A write that fails (a full disk, a read-only file system, a missing permission) leaves the previous
  file in place and raises ``WriteError``, naming the file, the cause and the space left on its file
  system; ``describe_os_error`` words any other ``OSError`` the same way.
- ``dumps`` / ``write_json`` write strict JSON: a non-finite float becomes the *string* ``"NaN"``,
  ``"Infinity"`` or ``"-Infinity"`` (the spellings Python's ``float()`` reads back), never a bare
  ``NaN`` literal that JSON parsers refuse.
- ``read_bounded(path, limit)`` reads a file only when it is at most ``limit`` bytes, so a manifest or
  spec cannot make a reader allocate without bound.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

PathLike = Union[str, Path]
JSON_LIMIT = 16 * 2**20  # bytes: the largest JSON file flowmaps reads back (manifests, status, metadata)


class WriteError(OSError):
    """A file could not be written; the previous version of it, if any, is unchanged. ``errno`` and
    ``filename`` are the failed write's; the message says what and where."""

    def __init__(self, message: str, code: Optional[int], path: PathLike):
        super().__init__(message)
        self.errno, self.filename = code, str(path)

    def __str__(self) -> str:
        return str(self.args[0])


def _free_space(path: Path) -> str:
    """The space left on the file system of ``path`` (its nearest existing parent), as text."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB free on {probe}"


def describe_os_error(err: OSError, path: Optional[PathLike] = None) -> str:
    """``err`` in one line: the file (``path``, else the error's own), the cause, and for a full disk or
    quota the free space."""
    where = Path(path) if path is not None else Path(err.filename) if err.filename else None
    cause = err.strerror or str(err)
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    text = f"{where}: {cause}" if where is not None else cause
    if code:
        text += f" ({code})"
    if where is not None and err.errno in (errno.ENOSPC, errno.EDQUOT):
        text += f"; {_free_space(where)}"
    return text


def _umask() -> int:
    """The process's umask: from ``/proc/self/status`` where Linux reports it (setting it to read it would
    let another thread create files under a zero umask meanwhile), else set and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions ``open`` (``0o666``) or ``mkdir`` (``0o777``) give under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    Raises ``WriteError`` (the old ``path`` untouched, the temporary file removed) when the file system
    refuses any part of it.
    """
    path = Path(path)
    tmp: Optional[str] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        if isinstance(err, WriteError):
            raise
        raise WriteError(f"cannot write {describe_os_error(err, path)}", err.errno, path) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """``data`` as the whole content of ``path``, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_npy_atomic(path: PathLike, array: Any) -> None:
    """``array`` as a ``.npy`` file at ``path`` (no pickles), atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def write_text_atomic(path: PathLike, text: str) -> None:
    """``text`` (UTF-8) as the whole content of ``path``, atomically."""
    write_bytes_atomic(path, text.encode())


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``
    (tuples become lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON of ``value`` (non-finite floats as strings, see ``json_safe``)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_json(path: PathLike, value: Any, indent: Optional[int] = 1) -> None:
    """``value`` as strict JSON in ``path``, atomically."""
    write_text_atomic(path, dumps(value, indent=indent) + "\n")


def read_bounded(path: PathLike, limit: int, what: str) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; ``ValueError`` naming
    ``what`` otherwise (``FileNotFoundError`` when it is missing)."""
    path = Path(path)
    size = path.stat().st_size
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file")
    if size > limit:
        raise ValueError(f"{what} {path} has {size} bytes, more than the {limit} a {what} may have")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {path} grew beyond {limit} bytes while it was read")
    return data


def read_json(path: PathLike, what: str, limit: int = JSON_LIMIT) -> Any:
    """The JSON value in ``path`` (at most ``limit`` bytes); ``ValueError`` naming ``what`` when it is
    too large or not JSON."""
    data = read_bounded(path, limit, what)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err


__all__ = [
    "JSON_LIMIT", "WriteError", "atomic_write", "default_mode", "describe_os_error", "dumps", "fsync_dir",
    "json_safe", "read_bounded", "read_json", "write_bytes_atomic", "write_json", "write_text_atomic",
]
