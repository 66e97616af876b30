"""What a run directory holds and who owns it: file names, the run's identity, ``status.json``, and
what happens to the files of an earlier run when a run starts.

One run per directory, always consistent:

- **Identity.** A run has an id (fresh when it starts from step 0, kept when it is resumed or extended)
  and the SHA-256 of its resolved config as ``config.yaml`` holds it (``config_hash``: the hash of that
  file's bytes, so a later flowmaps that adds keys with defaults still recognises it; extending
  ``train.steps`` changes it). Both
  are recorded in ``status.json``, the final weights' safetensors metadata and ``manifest.json``,
  ``metrics.json``, ``metrics.md``, ``samples.png``, ``divergence.json`` and every checkpoint's manifest.
- **Status.** ``status.json`` says ``running``, ``finished``, ``diverged``, ``interrupted`` or
  ``failed``, with the steps done and planned, the time, the run id and the config hash, and one entry
  per training session (from which step to which target, under which config). It is written
  atomically at the start, at every checkpoint and at the end, the ``finished`` state last of all,
  after the final weights, their manifest and the evaluation. ``running`` with no live holder of
  ``run.lock`` means the process was killed.
- **Ownership.** flowmaps owns the names below (``OWN_NAMES``) in a directory it recognises as a run
  directory (one with ``status.json``, or ``data_info.json`` for runs written before ``status.json``
  existed). Anything else there was not written by flowmaps and is never deleted or replaced.
- **A new run** (``prepare_new_run``) refuses a directory that holds anything, unless ``overwrite``;
  then it deletes the earlier run's own files (``status.json`` first, the weights before the config
  they belong to) and leaves every other file alone, refusing when one of those has a name flowmaps
  would write.
- **A resumed or extended run** (``clear_final_artefacts``) moves the final artefacts of a finished
  run into ``previous/`` (a run directory of its own: config, status, weights with their manifest,
  metrics, samples; it replaces an older ``previous/``) and deletes those of an unfinished one (a kill
  during the final save leaves partial ones). Final weights therefore exist only while the status
  says ``finished`` for the current config.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from flowmaps.files import read_json, write_json
from flowmaps.report import REPORT_FILE
from flowmaps.train.checkpoint import CHECKPOINTS_DIR
from flowmaps.train.config import Config, config_text

CONFIG_FILE = "config.yaml"
DATA_INFO_FILE = "data_info.json"
STATUS_FILE = "status.json"
LOCK_FILE = "run.lock"
LOG_FILE = "train_log.jsonl"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "model_ema.safetensors"
WEIGHTS_MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
METRICS_TABLE_FILE = "metrics.md"
SAMPLES_FILE = "samples.png"
DIVERGENCE_FILE = "divergence.json"
PREVIOUS_DIR = "previous"
TENSORBOARD_DIR = "tensorboard"  # train.tensorboard (flowmaps.train.tensorboard)
BENCH_OUTCOME_FILE = "bench_outcome.json"  # flowmaps bench's measurements of the run (flowmaps.bench.runner)
BENCH_PANELS_FILE = "bench_panels.safetensors"

FINAL_NAMES = (WEIGHTS_FILE, EMA_WEIGHTS_FILE, WEIGHTS_MANIFEST_FILE, METRICS_FILE, METRICS_TABLE_FILE, SAMPLES_FILE,
               REPORT_FILE, DIVERGENCE_FILE, BENCH_OUTCOME_FILE, BENCH_PANELS_FILE)
OWN_NAMES = FINAL_NAMES + (STATUS_FILE, CONFIG_FILE, DATA_INFO_FILE, LOG_FILE, CHECKPOINTS_DIR, TENSORBOARD_DIR,
                           PREVIOUS_DIR, LOCK_FILE)
STATES = ("running", "finished", "diverged", "interrupted", "failed")
STATUS_FORMAT = 1
_STAGING = ".previous.new"
_RETIRED = ".previous.old"


class RunDirectoryError(Exception):
    """A run directory cannot be used as asked (held by another process, holding another run or files
    flowmaps did not write, naming a file, not finished, or not the run being resumed); the message
    says what and where."""


class UnfinishedRunError(RunDirectoryError):
    """The run has no final weights to load: it is running, was interrupted, diverged or failed."""


def config_hash(cfg: Config) -> str:
    """SHA-256 of the resolved config as ``config.yaml`` holds it (``config_text``)."""
    return hashlib.sha256(config_text(cfg).encode()).hexdigest()


def file_config_hash(run_dir: Union[str, Path]) -> str:
    """SHA-256 of the bytes of ``run_dir/config.yaml`` (what ``config_hash`` gave when it was written)."""
    return hashlib.sha256((Path(run_dir) / CONFIG_FILE).read_bytes()).hexdigest()


def new_run_id() -> str:
    """A fresh run id: the UTC start time and 8 random hex digits (``20261201-205001-3fa9c2d1``)."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.urandom(4).hex()}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class RunIdentity:
    """Which run wrote an artefact (``run_id``) and under which resolved config (``config_hash``)."""

    run_id: str
    config_hash: str

    def metadata(self) -> dict[str, str]:
        """The identity as string metadata (safetensors, PNG)."""
        return {"flowmaps_run_id": self.run_id, "flowmaps_config_hash": self.config_hash}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Optional["RunIdentity"]:
        run_id, digest = metadata.get("flowmaps_run_id"), metadata.get("flowmaps_config_hash")
        return cls(run_id, digest) if isinstance(run_id, str) and isinstance(digest, str) else None


@dataclass
class RunStatus:
    """The content of ``status.json`` (module docstring)."""

    state: str
    step: int
    steps: int
    run_id: str
    config_hash: str
    updated: str = field(default_factory=_now)
    message: Optional[str] = None
    sessions: list[dict[str, Any]] = field(default_factory=list)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @property
    def identity(self) -> RunIdentity:
        return RunIdentity(self.run_id, self.config_hash)

    def describe(self) -> str:
        text = f"{self.state} at step {self.step} of {self.steps}, run {self.run_id}, updated {self.updated}"
        return f"{text}: {self.message}" if self.message else text


def write_status(run_dir: Path, status: RunStatus) -> None:
    """``status.json``, atomically (``status.updated`` set to now)."""
    if status.state not in STATES:
        raise ValueError(f"unknown run state {status.state!r}; states: {STATES}")
    status.updated = _now()
    write_json(Path(run_dir) / STATUS_FILE, {"format": STATUS_FORMAT, **asdict(status)})


def read_status(run_dir: Union[str, Path]) -> Optional[RunStatus]:
    """The run's ``status.json``; ``None`` when it has none (a run written before it existed). A file
    that is not a status of this format raises ``RunDirectoryError``."""
    path = Path(run_dir) / STATUS_FILE
    if not path.exists():
        return None
    try:
        values = read_json(path, "status file")
        if not isinstance(values, dict) or values.get("format") != STATUS_FORMAT:
            raise ValueError(f"format {values.get('format') if isinstance(values, dict) else None!r}, "
                             f"expected {STATUS_FORMAT}")
        values = {k: v for k, v in values.items() if k != "format"}
        status = RunStatus(**values)
    except (ValueError, TypeError) as err:
        raise RunDirectoryError(f"{path} is not a flowmaps status file ({err}); it was changed by hand or by "
                                "another program") from err
    if status.state not in STATES or not all(isinstance(v, int) for v in (status.step, status.steps)) \
            or not all(isinstance(v, str) for v in (status.run_id, status.config_hash)):
        raise RunDirectoryError(f"{path} is not a flowmaps status file (state {status.state!r}, step {status.step!r}, "
                                f"steps {status.steps!r})")
    return status


def is_run_directory(path: Path) -> bool:
    """Whether flowmaps wrote ``path`` as a run directory (``status.json``; ``data_info.json`` for older runs)."""
    return (path / STATUS_FILE).is_file() or (path / DATA_INFO_FILE).is_file()


def _is_leftover(name: str) -> bool:
    """A hidden temporary file of an interrupted atomic write of one of flowmaps' files, or a staging
    directory of ``previous/``."""
    if name in (_STAGING, _RETIRED):
        return True
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return name[1:].split(".tmp", 1)[0].rsplit(".", 1)[0] in OWN_NAMES  # .NAME.RANDOM.tmp


def check_directory(path: Path) -> None:
    """``RunDirectoryError`` when ``path`` exists and is not a directory."""
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"{path} is a file, not a run directory: choose another --out")


def missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, innermost first: what ``mkdir(parents=True)`` creates."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_if_empty(folders: Sequence[Path]) -> None:
    """Delete each of ``folders`` (innermost first) while it is empty: a run refused before it wrote
    anything leaves no empty ``--out`` behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or already gone): it and its parents stay


def contents(path: Path) -> tuple[list[str], list[str]]:
    """``(own, foreign)``: the entries of ``path`` flowmaps wrote (``run.lock`` aside) and the others."""
    if not path.is_dir():
        return [], []
    names = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
    if not is_run_directory(path):
        return [], names
    own = [n for n in names if n in OWN_NAMES or _is_leftover(n)]
    return own, [n for n in names if n not in own]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _listing(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def prepare_new_run(path: Path, overwrite: bool) -> None:
    """Make ``path`` ready for a run that starts at step 0 (module docstring); ``RunDirectoryError``
    when it holds another run or foreign files and ``overwrite`` is false. Temporaries of interrupted
    writes go first: they hold nothing."""
    check_directory(path)
    remove_leftovers(path)
    own, foreign = contents(path)
    if not overwrite and (own or foreign):
        found = []
        if own:
            status = read_status(path)
            what = status.describe() if status is not None else "written by an older flowmaps, without status.json"
            found.append(f"already holds a flowmaps run ({what})")
        if foreign:
            found.append(f"holds files flowmaps did not write ({_listing(foreign)})")
        hint = f"continue it with `flowmaps train --resume {path}` (add --steps N to train longer), " if own else ""
        raise RunDirectoryError(f"{path} {' and '.join(found)}: {hint}choose another --out, or pass --overwrite to "
                                "start afresh there (it deletes only flowmaps' own files and leaves any others)")
    clashing = [n for n in foreign if n in OWN_NAMES]
    if clashing:
        raise RunDirectoryError(f"{path / clashing[0]} was not written by flowmaps ({path} holds no flowmaps run), and "
                                "--overwrite deletes only flowmaps' own files: move it away or choose another --out")
    # nothing claims "finished" first, the weights go before the config they belong to, and data_info.json,
    # which marks the directory as flowmaps', last: a kill half-way leaves a directory --overwrite still clears
    first, last = [STATUS_FILE, WEIGHTS_FILE, EMA_WEIGHTS_FILE, WEIGHTS_MANIFEST_FILE], [CONFIG_FILE, DATA_INFO_FILE]
    rank = {name: i for i, name in enumerate(first)} | {name: 100 + i for i, name in enumerate(last)}
    for name in sorted(own, key=lambda n: rank.get(n, 50)):
        _remove(path / name)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copy2(source, target)


def clear_final_artefacts(path: Path, old: Optional[RunStatus], new: Callable[[], None]) -> Optional[Path]:
    """At the start of a resumed run: retire the final artefacts of the earlier session, calling ``new()``
    (which writes the new ``status.json``) once nothing in ``path`` claims them any more.

    A finished run's artefacts (or, without ``status.json``, final weights of an older flowmaps) are
    first linked into ``previous/`` with the config and status they belong to, so that a kill at any
    point leaves either the finished run in place or its copy whole in ``previous/``; an unfinished
    run's are deleted. Returns ``previous/`` when it was written.
    """
    present = [n for n in FINAL_NAMES if (path / n).exists()]
    keep = bool(present) and (old.state == "finished" if old is not None else (path / WEIGHTS_FILE).exists())
    previous = None
    if keep:
        staging, retired = path / _STAGING, path / _RETIRED
        for leftover in (staging, retired):
            if leftover.exists():
                _remove(leftover)
        staging.mkdir()
        for name in present + [n for n in (CONFIG_FILE, DATA_INFO_FILE, STATUS_FILE) if (path / n).exists()]:
            _link_or_copy(path / name, staging / name)
        previous = path / PREVIOUS_DIR
        if previous.exists():
            os.replace(previous, retired)
        os.replace(staging, previous)
        if retired.exists():
            _remove(retired)
    new()
    for name in present:
        _remove(path / name)
    return previous


def remove_leftovers(path: Path) -> None:
    """Delete the hidden temporaries that interrupted writes of flowmaps' files left in ``path``
    (``.NAME.RANDOM.tmp`` for a name of ``OWN_NAMES``, and the staging directories of ``previous/``)."""
    if path.is_dir():
        for p in path.iterdir():
            if _is_leftover(p.name):
                _remove(p)


__all__ = [
    "CONFIG_FILE", "DATA_INFO_FILE", "DIVERGENCE_FILE", "EMA_WEIGHTS_FILE", "FINAL_NAMES", "LOCK_FILE", "LOG_FILE",
    "METRICS_FILE", "METRICS_TABLE_FILE", "OWN_NAMES", "PREVIOUS_DIR", "RunDirectoryError", "RunIdentity",
    "RunStatus", "SAMPLES_FILE", "STATES", "STATUS_FILE", "UnfinishedRunError", "WEIGHTS_FILE",
    "WEIGHTS_MANIFEST_FILE", "check_directory", "clear_final_artefacts", "config_hash", "contents",
    "file_config_hash", "is_run_directory", "missing_ancestors", "new_run_id", "prepare_new_run", "read_status",
    "remove_if_empty", "remove_leftovers", "write_status",
]
