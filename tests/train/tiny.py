"""Tiny training configurations and file comparisons shared by the training tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from flowmaps.train.config import Config
from flowmaps.build import config_from_dict

BASE: dict[str, Any] = {
    "model": {"width": 32, "depth": 1},
    "method": {"name": "lsd"},
    "optim": {"warmup_steps": 4},
    "train": {"steps": 24, "batch_size": 64, "seed": 3, "log_every": 1, "device": "cpu"},
    "checkpoint": {"every": 8, "keep_last": 2},
    "eval": {"n_samples": 256, "nfe": [1], "ode_steps": 2},
}


def write_array_data(path: Path, rows: int = 200, seed: int = 0) -> Path:
    """A small ``[rows, 2]`` .npy data set (served in shuffled epochs, so the data order is state)."""
    rng = np.random.default_rng(seed)
    np.save(path, rng.normal(size=(rows, 2)).astype(np.float32))
    return path


def tiny_values(data: Optional[Path] = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """``BASE`` with ``sections`` merged in (section by section) and, if given, an array data file."""
    values = copy.deepcopy(BASE)
    if data is not None:
        values["data"] = {"name": str(data)}
    for name, entries in sections.items():
        values[name] = entries if name == "method" else {**values.get(name, {}), **entries}
    return values


def tiny_config(data: Optional[Path] = None, **sections: dict[str, Any]) -> Config:
    return config_from_dict(tiny_values(data, **sections))


def cli_args(values: dict[str, Any]) -> list[str]:
    """``--set`` arguments that reproduce ``values`` on the command line."""
    args = []
    for section, entries in values.items():
        for key, value in entries.items():
            text = str(value).replace(" ", "") if isinstance(value, list) else str(value).lower() if isinstance(value, bool) else value
            args += ["--set", f"{section}.{key}={text}"]
    return args


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    """Equal keys and values (bit for bit when ``atol == 0``)."""
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), f"{k} differs (max {float((a[k] - b[k]).abs().max()):.3g})"
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k} differs by {float((a[k] - b[k]).abs().max()):.3g}"
