"""Weights on disk: safetensors files written atomically and read without unpickling."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


def atomic_write(path: Union[str, Path], write) -> None:
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
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_weights(module: nn.Module, path: Union[str, Path]) -> None:
    """Write ``module``'s state dict to a safetensors file, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def load_weights(module: nn.Module, path: Union[str, Path]) -> None:
    """Load a safetensors file into ``module`` (strict), with a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"weights file {path} is corrupt or not a safetensors file: {err}") from err
    device = next(module.parameters()).device
    try:
        module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights file {path} does not match the model: {err}") from err


__all__ = ["atomic_write", "save_weights", "load_weights"]
