"""Weights and training checkpoints on disk: atomic writes, verified reads, nothing unpickled.

Weights are safetensors files. A training checkpoint is a directory
``RUN_DIR/checkpoints/step_00001000`` (named by the number of optimiser steps done) holding

- ``model.safetensors`` and ``model_ema.safetensors``: the raw and EMA weights;
- ``state.pt``: optimiser, gradient scaler, EMA counter, data order, guard state and every RNG
  state (per rank: torch CPU, CUDA, Python, NumPy; per data shard: its generator), made of tensors
  and plain Python values only. It is written by ``torch.save`` and read back with
  ``torch.load(weights_only=True)``, which refuses arbitrary objects;
- ``manifest.json``, written last: the step, the size and SHA-256 of each file, and the mean
  training loss of the interval before the checkpoint (which decides the "best" one).

Writing goes to a hidden temporary directory whose files are fsynced before it is renamed into
place (atomic on POSIX) and the parent directory is fsynced: a reader sees a whole checkpoint or
none, and a process killed mid-write leaves only the temporary directory, removed at the next start.
Reading checks every file against the manifest before deserialising it, so a truncated or
corrupted checkpoint raises ``CheckpointError``; ``CheckpointStore.latest_valid`` reports it and
falls back to the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save, save_file
from torch import nn

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, truncated, corrupted or does not fit the model."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_weights(module: nn.Module, path: Union[str, Path]) -> None:
    """Write ``module``'s state dict to a safetensors file, atomically."""
    state = _cpu_state(module)
    atomic_write(path, lambda tmp: save_file(state, tmp))


def _load_state_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    device = next(module.parameters()).device
    try:
        module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where} does not match the model: {err}") from err


def load_weights(module: nn.Module, path: Union[str, Path]) -> None:
    """Load a safetensors file into ``module`` (strict), with a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"weights file {path} is corrupt or not a safetensors file: {err}") from err
    _load_state_into(module, state, f"weights file {path}")  # CheckpointError is a ValueError


def capture_rng() -> dict[str, Any]:
    """This process's global RNG states: torch CPU, every CUDA device, Python ``random``, NumPy."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``. CUDA states are restored when this process sees CUDA devices."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


@dataclass
class Checkpoint:
    """A complete checkpoint directory: ``step`` optimiser steps done; ``metric`` its interval's mean loss."""

    path: Path
    step: int
    metric: Optional[float]


@dataclass
class LoadedCheckpoint:
    """What ``CheckpointStore.load`` read: the checkpoint, both weight sets and the training state."""

    checkpoint: Checkpoint
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    state: dict[str, Any]

    def apply_weights(self, model: nn.Module, ema_model: nn.Module) -> None:
        _load_state_into(model, self.model, f"checkpoint {self.checkpoint.path} ({MODEL_FILE})")
        _load_state_into(ema_model, self.ema, f"checkpoint {self.checkpoint.path} ({EMA_FILE})")


class CheckpointStore:
    """The checkpoints of one run directory: atomic save, verified load, retention of last K plus best.

    Only one process (rank 0) saves; every process may load.
    """

    def __init__(self, run_dir: Union[str, Path], keep_last: int = 3, keep_best: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1; got {keep_last}")
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.keep_best = keep_best

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def remove_temporaries(self) -> None:
        """Delete what interrupted writes left behind (hidden ``.tmp-*`` / ``.old-*`` directories)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(p, ignore_errors=True)

    def save(
        self,
        step: int,
        model: nn.Module,
        ema_model: nn.Module,
        state: dict[str, Any],
        metric: Optional[float] = None,
    ) -> Checkpoint:
        """Write checkpoint ``step`` atomically, then prune old ones; returns it."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files = {MODEL_FILE: save(_cpu_state(model)), EMA_FILE: save(_cpu_state(ema_model)),
                 STATE_FILE: buffer.getvalue()}
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "metric": metric,
            "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()},
        }
        files[MANIFEST_FILE] = json.dumps(manifest, indent=1).encode()
        final = self.path_for(step)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root))
        try:
            for name, data in files.items():  # the manifest last: its presence marks a finished write
                _write_bytes(tmp / name, data)
            _fsync_dir(tmp)
            aside = None
            if final.exists():  # the same step written again (after a rollback or a resume)
                aside = self.root / f".old-{final.name}-{os.getpid()}"
                os.replace(final, aside)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return Checkpoint(final, step, metric)

    def checkpoints(self) -> list[Checkpoint]:
        """Checkpoint directories by increasing step (not verified; an unreadable manifest gives metric None)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            match = _NAME.match(p.name)
            if match and p.is_dir():
                try:
                    metric = json.loads((p / MANIFEST_FILE).read_text()).get("metric")
                except (OSError, ValueError, AttributeError):
                    metric = None
                found.append(Checkpoint(p, int(match.group(1)), metric if isinstance(metric, (int, float)) else None))
        return sorted(found, key=lambda c: c.step)

    def _prune(self) -> None:
        existing = self.checkpoints()
        keep = {c.path for c in existing[-self.keep_last:]}
        scored = [c for c in existing if c.metric is not None]
        if self.keep_best and scored:
            keep.add(min(scored, key=lambda c: (c.metric, -c.step)).path)
        for c in existing:
            if c.path not in keep:
                shutil.rmtree(c.path, ignore_errors=True)

    def load(self, checkpoint: Union[Checkpoint, Path]) -> LoadedCheckpoint:
        """Read and verify a checkpoint; raises ``CheckpointError`` naming the file that is wrong."""
        path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            step, listed = int(manifest["step"]), manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} is incomplete: cannot read {MANIFEST_FILE} ({err})") from err
        if manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}; expected {FORMAT_VERSION}")
        data = {name: self._read_verified(path, name, listed) for name in (MODEL_FILE, EMA_FILE, STATE_FILE)}
        try:
            model = load_safetensors_bytes(data[MODEL_FILE])
            ema = load_safetensors_bytes(data[EMA_FILE])
        except (SafetensorError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path}: weights cannot be read: {err}") from err
        try:
            state = torch.load(io.BytesIO(data[STATE_FILE]), map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types; none may pass silently
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} cannot be read safely: {err}") from err
        if not isinstance(state, dict) or state.get("step") != step:
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} does not hold the state of step {step}")
        metric = manifest.get("metric")
        return LoadedCheckpoint(Checkpoint(path, step, metric), model, ema, state)

    @staticmethod
    def _read_verified(path: Path, name: str, listed: dict[str, Any]) -> bytes:
        if name not in listed:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} does not list {name}")
        try:
            data = (path / name).read_bytes()
        except OSError as err:
            raise CheckpointError(f"checkpoint {path}: cannot read {name} ({err})") from err
        expected = listed[name]
        if len(data) != expected.get("bytes"):
            raise CheckpointError(
                f"checkpoint {path}: {name} is truncated or altered ({len(data)} bytes, expected {expected.get('bytes')})"
            )
        if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            raise CheckpointError(f"checkpoint {path}: {name} is corrupted (SHA-256 does not match the manifest)")
        return data

    def latest_valid(self, report: Callable[[str], None]) -> Optional[LoadedCheckpoint]:
        """The newest checkpoint that passes verification; each bad one is ``report``-ed and skipped."""
        for checkpoint in reversed(self.checkpoints()):
            try:
                return self.load(checkpoint)
            except CheckpointError as err:
                report(f"skipping a bad checkpoint: {err}")
        return None


__all__ = [
    "CHECKPOINTS_DIR", "Checkpoint", "CheckpointError", "CheckpointStore", "LoadedCheckpoint", "atomic_write",
    "capture_rng", "load_weights", "restore_rng", "save_weights",
]
