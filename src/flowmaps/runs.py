"""Run directories as ``flowmaps.load`` reads them: finished runs only, with verified final weights.

``flowmaps.train.rundir`` lists what a run directory holds. ``load`` reads a *finished* run and checks
that everything in it belongs together before it trusts the weights: ``status.json`` says ``finished``;
``manifest.json`` names the same run id and config hash; ``config.yaml`` still hashes to that config;
the weights file has the size and SHA-256 its manifest lists (the size checked before it is read),
carries the run's identity in its metadata, and holds only finite values.

A run that is running, was interrupted, diverged or failed has no final weights: ``load`` refuses it
with ``UnfinishedRunError`` unless ``allow_unfinished=True``, which loads the weights of its newest
valid checkpoint instead (with a warning). A run written before ``status.json`` existed loads as it
always did, after the finite-value check (it has no manifest to verify against).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from flowmaps.build import build_model, load_run_config, resolve_device
from flowmaps.files import read_json
from flowmaps.flow_map import FlowMap
from flowmaps.methods import get_method_class
from flowmaps.train.checkpoint import CheckpointError, CheckpointStore, load_weights, read_weights_manifest
from flowmaps.train.rundir import (
    CONFIG_FILE, DATA_INFO_FILE, EMA_WEIGHTS_FILE, WEIGHTS_FILE, WEIGHTS_MANIFEST_FILE, RunDirectoryError, RunIdentity,
    RunStatus, UnfinishedRunError, file_config_hash, read_status,
)

logger = logging.getLogger("flowmaps.runs")
MAX_DIM = 2**20  # data dimensions a run directory may declare


@dataclass(frozen=True)
class DataInfo:
    """What ``data_info.json`` records of a run's data: its name, one sample's shape, its classes."""

    name: str
    shape: tuple[int, ...]
    num_classes: int = 0

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def data_info(run_dir: Path) -> DataInfo:
    """The data a run was trained on, from ``data_info.json`` (``shape`` and ``num_classes``; a run written
    before they were recorded has ``dim`` alone: vectors, unlabelled), checked for sensible values."""
    path = run_dir / DATA_INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a complete flowmaps run directory (no {DATA_INFO_FILE})")
    info = read_json(path, "data info file")
    if not isinstance(info, dict):
        raise RunDirectoryError(f"{path} must hold a JSON object; got {type(info).__name__}")
    shape = info.get("shape", [info.get("dim")])
    if (not isinstance(shape, list) or not shape or not all(map(_positive_int, shape))
            or not math.prod(shape) <= MAX_DIM):
        raise RunDirectoryError(f"{path} does not hold a sample shape of positive sizes with at most {MAX_DIM} "
                                f"values; got {shape!r}")
    num_classes = info.get("num_classes", 0)
    if not (num_classes == 0 or _positive_int(num_classes)):
        raise RunDirectoryError(f"{path} does not hold a class count (a non-negative integer); got {num_classes!r}")
    return DataInfo(str(info.get("name", "")), tuple(shape), num_classes)


def data_dim(run_dir: Path) -> int:
    """The data dimension (values per sample) of a run, from ``data_info.json``."""
    return data_info(run_dir).dim


def _verify_final(run_dir: Path, name: str, expected: RunIdentity, model: FlowMap) -> dict[str, Any]:
    """Load the final weights ``name`` into ``model`` after every check of the module docstring."""
    manifest_path = run_dir / WEIGHTS_MANIFEST_FILE
    manifest = read_weights_manifest(manifest_path)
    recorded = RunIdentity.from_metadata(manifest["metadata"])
    if recorded != expected:
        raise CheckpointError(f"{manifest_path} belongs to {recorded} but status.json to {expected}: the final "
                              "weights are not this run's")
    listed = manifest["files"].get(name)
    if not isinstance(listed, dict):
        raise CheckpointError(f"{manifest_path} does not list {name}")
    metadata = load_weights(model, run_dir / name, listed)
    if RunIdentity.from_metadata(metadata) != expected:
        raise CheckpointError(f"weights file {run_dir / name} carries the identity "
                              f"{RunIdentity.from_metadata(metadata)}, not this run's {expected}")
    return {"weights": name, "run_id": expected.run_id, "config_hash": expected.config_hash, "state": "finished"}


def _load_checkpoint(run_dir: Path, ema: bool, model: FlowMap, status: RunStatus) -> dict[str, Any]:
    """Load the newest valid checkpoint's weights into ``model`` (``allow_unfinished``)."""
    why = f"has status {status.state} at step {status.step}"
    loaded = CheckpointStore(run_dir).latest_valid(report=logger.warning)
    if loaded is None:
        raise RunDirectoryError(f"{run_dir} {why} and has no valid checkpoint to load instead")
    state = loaded.ema if ema else loaded.model
    model.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in state.items()}, strict=True)
    logger.warning(f"{run_dir} {why}: using the weights of its checkpoint {loaded.checkpoint.path.name} "
                   f"({loaded.checkpoint.step} steps)")
    run = loaded.run or {}
    return {"weights": f"{loaded.checkpoint.path.name}/{'model_ema' if ema else 'model'}.safetensors",
            "run_id": run.get("run_id"), "config_hash": run.get("config_hash"), "state": status.state}


def load(
    run_dir: Union[str, Path],
    ema: bool = True,
    device: Union[str, torch.device] = "cpu",
    *,
    allow_unfinished: bool = False,
) -> FlowMap:
    """The trained ``FlowMap`` of a finished run (EMA weights by default), in eval mode, callable as
    ``model(x, s, t)``, verified as the module docstring says.

    Its ``sampler`` is its method's (``flowmaps.samplers.sample(model, noise, steps)`` uses it) and its
    ``provenance`` says which weights were loaded (file, run id, config hash, run state). A run that has
    not finished raises ``UnfinishedRunError``; ``allow_unfinished=True`` loads its newest valid
    checkpoint instead. Faulty weights raise ``CheckpointError`` naming the file and the fault.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a flowmaps run directory (no {CONFIG_FILE})")
    status = read_status(run_dir)
    if status is not None and status.state != "finished" and not allow_unfinished:
        raise UnfinishedRunError(
            f"{run_dir} is not a finished run (status: {status.describe()}), so it has no final weights; "
            f"continue it with `flowmaps train --resume {run_dir}`, or load its newest checkpoint with "
            "allow_unfinished=True (flowmaps sample --allow-unfinished)")
    cfg = load_run_config(run_dir / CONFIG_FILE)
    device = resolve_device(str(device))
    info = data_info(run_dir)
    if info.num_classes != cfg.model.num_classes:
        raise RunDirectoryError(f"{run_dir}: {DATA_INFO_FILE} records {info.num_classes} classes but config.yaml "
                                f"has model.num_classes = {cfg.model.num_classes}")
    model = build_model(cfg, info.shape).to(device)
    model.sampler = get_method_class(cfg.method["name"]).sampler
    model.grid_rho = float(cfg.method.get("grid_rho", 1.0))  # the grids it trained on (a run records its options)
    name = EMA_WEIGHTS_FILE if ema else WEIGHTS_FILE
    if status is None:
        load_weights(model, run_dir / name)
        model.provenance = {"weights": name, "run_id": None, "config_hash": None, "state": "unknown (no status.json)"}
    elif status.state != "finished":
        model.provenance = _load_checkpoint(run_dir, ema, model, status)
    else:
        if file_config_hash(run_dir) != status.config_hash:
            raise RunDirectoryError(f"{run_dir / CONFIG_FILE} was changed after the run finished (its hash is not "
                                    f"the config hash {status.config_hash[:12]}... in status.json): the weights were "
                                    "trained under another config")
        model.provenance = _verify_final(run_dir, name, status.identity, model)
    return model.eval().requires_grad_(False)


__all__ = ["CONFIG_FILE", "DATA_INFO_FILE", "EMA_WEIGHTS_FILE", "WEIGHTS_FILE", "DataInfo", "data_dim", "data_info",
           "load"]
