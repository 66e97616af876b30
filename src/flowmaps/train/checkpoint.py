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
Reading checks every file's size (before reading it) and SHA-256 against the manifest before
deserialising it, and the weights for non-finite values, so a truncated, corrupted or poisoned
checkpoint raises ``CheckpointError``; ``CheckpointStore.latest_valid`` reports it and falls back to
the previous checkpoint, as it does for a checkpoint its caller cannot use (a ``state.pt`` without the
keys the trainer needs). A write that fails (a full disk) raises ``flowmaps.files.WriteError`` and
leaves every earlier checkpoint as it was.

The final weights of a run are safetensors files with string metadata (the run's identity) and a
manifest of their sizes and SHA-256 (``save_weights_with_manifest``); ``load_weights`` checks a
weights file against its manifest entry, reads its metadata and refuses non-finite values.
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
from safetensors.torch import save
from torch import nn

from flowmaps.files import (
    WriteError, atomic_write, default_mode, describe_os_error, dumps, fsync_dir, read_json, write_bytes_atomic,
    write_json,
)

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})$")


_HEADER_LIMIT = 100 * 2**20  # bytes of a safetensors header (the JSON index of its tensors)


class CheckpointError(ValueError):
    """A checkpoint or weights file is incomplete, truncated, corrupted, non-finite or does not fit the model."""


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_weights(
    module: nn.Module, path: Union[str, Path], metadata: Optional[dict[str, str]] = None
) -> dict[str, Any]:
    """Write ``module``'s state dict to a safetensors file (with string ``metadata``), atomically;
    returns its size and SHA-256 (a manifest entry)."""
    data = save(_cpu_state(module), metadata=metadata)
    write_bytes_atomic(path, data)
    return _digest(data)


def save_weights_with_manifest(weights: dict[Path, nn.Module], manifest: Path, metadata: dict[str, str]) -> None:
    """Each module's weights to its path (with ``metadata``), then ``manifest``: their sizes and SHA-256
    and the metadata, written last so that its presence marks a whole set."""
    files = {path.name: save_weights(module, path, metadata) for path, module in weights.items()}
    write_json(manifest, {"format": FORMAT_VERSION, "metadata": metadata, "files": files})


def read_weights_manifest(path: Path) -> dict[str, Any]:
    """The manifest ``save_weights_with_manifest`` wrote; ``CheckpointError`` when it is missing or malformed."""
    try:
        manifest = read_json(path, "weights manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
        if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("metadata"), dict):
            raise ValueError("no files or metadata")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"weights manifest {path} is missing or malformed ({err}): the final weights "
                              "cannot be verified") from err
    return manifest


def _check_size(path: Path, listed: Optional[dict[str, Any]], where: str) -> None:
    """Compare the size of ``path`` with its manifest entry before anything is read."""
    if listed is None:
        return
    size = path.stat().st_size
    if size != listed.get("bytes"):
        raise CheckpointError(
            f"{where}: {path.name} is truncated or altered ({size} bytes, expected {listed.get('bytes')})")


def _check_digest(data: bytes, listed: Optional[dict[str, Any]], name: str, where: str) -> None:
    if listed is not None and hashlib.sha256(data).hexdigest() != listed.get("sha256"):
        raise CheckpointError(f"{where}: {name} is corrupted (SHA-256 does not match the manifest)")


def _safetensors_metadata(data: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes, with the header's length checked against the data."""
    if len(data) < 8:
        raise CheckpointError(f"{where} is not a safetensors file ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, _HEADER_LIMIT):
        raise CheckpointError(f"{where} is not a safetensors file (a header of {size} bytes in {len(data)})")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as err:
        raise CheckpointError(f"{where} is not a safetensors file (its header is not JSON: {err})") from err
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        names = ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:4])
        raise CheckpointError(f"{where} holds {sum(bad.values())} non-finite value(s) (NaN or inf): {names}")


def _deserialize(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        state = load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{where} is corrupt or not a safetensors file: {err}") from err
    _check_finite(state, where)
    return state


def read_weights(
    path: Union[str, Path], listed: Optional[dict[str, Any]] = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state, metadata)`` of a safetensors file, verified: its size and SHA-256 against the manifest
    entry ``listed`` (when given; the size before reading), then its structure and finite values."""
    path = Path(path)
    where = f"weights file {path}"
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    _check_size(path, listed, where)
    data = path.read_bytes()
    _check_digest(data, listed, path.name, where)
    state = _deserialize(data, where)
    return state, _safetensors_metadata(data, where)


def _load_state_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    device = next(module.parameters()).device
    try:
        module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where} does not match the model: {err}") from err


def load_weights(module: nn.Module, path: Union[str, Path], listed: Optional[dict[str, Any]] = None) -> dict[str, str]:
    """Load a safetensors file into ``module`` (strict), verified as ``read_weights`` says; returns its
    metadata. Missing files raise ``FileNotFoundError``, every other fault ``CheckpointError``."""
    state, metadata = read_weights(path, listed)
    _load_state_into(module, state, f"weights file {path}")
    return metadata


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
    """What ``CheckpointStore.load`` read: the checkpoint, both weight sets, the training state and the
    run description its writer recorded (``None`` for checkpoints written before it was recorded)."""

    checkpoint: Checkpoint
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    state: dict[str, Any]
    run: Optional[dict[str, Any]] = None

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
        run: Optional[dict[str, Any]] = None,
    ) -> Checkpoint:
        """Write checkpoint ``step`` atomically, then prune old ones; returns it. ``run`` (JSON values: the
        run's identity and what a resume must match) goes into the manifest. ``WriteError`` when the
        file system refuses the write: the earlier checkpoints, and an earlier one of this step, stay."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files = {MODEL_FILE: save(_cpu_state(model)), EMA_FILE: save(_cpu_state(ema_model)),
                 STATE_FILE: buffer.getvalue()}
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "metric": metric,
            "run": run,
            "files": {name: _digest(data) for name, data in files.items()},
        }
        files[MANIFEST_FILE] = dumps(manifest, indent=1).encode()
        final = self.path_for(step)
        tmp: Optional[Path] = None
        aside: Optional[Path] = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root))
            os.chmod(tmp, default_mode(directory=True))
            for name, data in files.items():  # the manifest last: its presence marks a finished write
                _write_bytes(tmp / name, data)
            fsync_dir(tmp)
            if final.exists():  # the same step written again (after a rollback or a resume)
                aside = self.root / f".old-{final.name}-{os.getpid()}"
                os.replace(final, aside)
            os.replace(tmp, final)
            tmp = None
            fsync_dir(self.root)
        except BaseException as err:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                if aside is not None and not final.exists():
                    os.replace(aside, final)  # put the earlier checkpoint of this step back
                    aside = None
            if isinstance(err, OSError) and not isinstance(err, WriteError):
                raise WriteError(f"cannot write checkpoint {describe_os_error(err, final)}; the earlier "
                                 "checkpoints are kept", err.errno, final) from err
            raise
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
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
                    metric = read_json(p / MANIFEST_FILE, "checkpoint manifest").get("metric")
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
            manifest = read_json(path / MANIFEST_FILE, "checkpoint manifest")
            step, listed = int(manifest["step"]), dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} is incomplete: cannot read {MANIFEST_FILE} ({err})") from err
        if manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}; expected {FORMAT_VERSION}")
        data = {name: self._read_verified(path, name, listed) for name in (MODEL_FILE, EMA_FILE, STATE_FILE)}
        model = _deserialize(data[MODEL_FILE], f"checkpoint {path}: {MODEL_FILE}")
        ema = _deserialize(data[EMA_FILE], f"checkpoint {path}: {EMA_FILE}")
        try:
            state = torch.load(io.BytesIO(data[STATE_FILE]), map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types; none may pass silently
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} cannot be read safely: {err}") from err
        if not isinstance(state, dict) or state.get("step") != step:
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} does not hold the state of step {step}")
        metric = manifest.get("metric")
        run = manifest.get("run")
        run = run if isinstance(run, dict) else None
        return LoadedCheckpoint(Checkpoint(path, step, metric), model, ema, state, run)

    @staticmethod
    def _read_verified(path: Path, name: str, listed: dict[str, Any]) -> bytes:
        if not isinstance(listed.get(name), dict):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} does not list {name}")
        where = f"checkpoint {path}"
        try:
            _check_size(path / name, listed[name], where)
            data = (path / name).read_bytes()
        except OSError as err:
            raise CheckpointError(f"checkpoint {path}: cannot read {name} ({err})") from err
        _check_digest(data, listed[name], name, where)
        return data

    def latest_valid(
        self, report: Callable[[str], None], use: Optional[Callable[[LoadedCheckpoint], None]] = None
    ) -> Optional[LoadedCheckpoint]:
        """The newest checkpoint that passes verification and, when given, that ``use`` accepts (``use``
        raises ``CheckpointError`` for one it cannot use, e.g. a state without a key it needs); each bad
        one is ``report``-ed and skipped."""
        for checkpoint in reversed(self.checkpoints()):
            try:
                loaded = self.load(checkpoint)
                if use is not None:
                    use(loaded)
                return loaded
            except CheckpointError as err:
                report(f"skipping a bad checkpoint: {err}")
        return None


__all__ = [
    "CHECKPOINTS_DIR", "Checkpoint", "CheckpointError", "CheckpointStore", "LoadedCheckpoint", "atomic_write",
    "capture_rng", "load_weights", "read_weights", "read_weights_manifest", "restore_rng", "save_weights",
    "save_weights_with_manifest",
]
