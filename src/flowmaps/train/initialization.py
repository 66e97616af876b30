"""Initialisation of a fresh run from a trained run: ``train.init_from`` (``flowmaps train --init-from RUN_DIR``).

Before the first step of a fresh run, every parameter and buffer of the new run's ``FlowMap`` takes
the value of the tensor of the same name in the source run's EMA weights, bit for bit:

    theta[name] <- theta_source_ema[name]   for every parameter and buffer name,

and the trainer's evaluation EMA then starts from these weights. A resumed run restores its checkpoint
instead and is never initialised again (``--restart`` of a run without a checkpoint starts from step 0
and initialises as a fresh run does). The initialisation replaces the method's own
(``Method.initialize``: ECT's copy of its teacher).

Warm starting from a trained diffusion model is ECT's recipe (Geng, Pokle, Luo, Lin & Kolter 2024,
"Consistency models made easy", arXiv 2406.14548); here every method may start so, for example a
distillation or self-distillation run from a flow-matching (``fm``) run, or a student of a guided
teacher (``guidance.teacher_scale``) from the conditional one. The source is a finished flowmaps run
directory (``flowmaps.runs.load`` verifies its weights) trained on samples of the same shape with the
same ``model.num_classes``, whose network is the new run's: the same parameter and buffer names,
shapes and dtypes, which the same ``model`` section (backbone and options) gives; a backbone option
the new run's config leaves unset takes the source's (``source_model_options``), before any default
of the new run's method. A diffusers folder is no source: its UNet is another architecture (it can
be a distillation teacher, ``--teacher diffusers:DIR``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from flowmaps.build import load_run_config
from flowmaps.flow_map import FlowMap
from flowmaps.runs import CONFIG_FILE, data_info, load
from flowmaps.teachers.loading import DIFFUSERS_PREFIX

LISTED_MISMATCHES = 5  # mismatching tensors an error names


class InitializationError(ValueError):
    """``train.init_from`` names no run a fresh run can start from: not a run directory, a run of other
    data, or a network whose parameters and buffers differ from the new run's."""


def load_source(spec: str, shape: tuple[int, ...], num_classes: int,
                device: Union[str, torch.device] = "cpu") -> FlowMap:
    """The EMA ``FlowMap`` of the run directory ``spec``, after checking (``data_info.json``) that it
    was trained on samples of ``shape`` with ``num_classes`` classes."""
    if spec.startswith(DIFFUSERS_PREFIX):
        raise InitializationError(
            f"train.init_from {spec!r}: a diffusers model has another architecture than a flowmaps network, so its "
            "weights cannot initialise one; give a flowmaps run directory (a diffusers model can be the teacher: "
            f"--teacher {spec})")
    path = Path(spec)
    if not (path / CONFIG_FILE).is_file():
        raise InitializationError(
            f"train.init_from {spec!r} is not a flowmaps run directory (no {CONFIG_FILE}): give the directory of a "
            "finished run with the same model section")
    try:
        info = data_info(path)
    except FileNotFoundError as err:
        raise InitializationError(f"train.init_from: {err}") from err
    if info.shape != tuple(shape) or info.num_classes != num_classes:
        raise InitializationError(
            f"train.init_from {spec!r} was trained on samples of shape {list(info.shape)} with {info.num_classes} "
            f"classes; this run has samples of shape {list(shape)} with model.num_classes = {num_classes}")
    return load(path, ema=True, device=device)


def source_model_options(spec: Optional[str], backbone: str) -> dict[str, Any]:
    """The backbone options that the run directory ``spec`` (``train.init_from``, or a resumed run
    itself) recorded, where it is one whose backbone is ``backbone``; else none (for an init source,
    ``load_source`` names what is wrong, later)."""
    if spec is None or spec.startswith(DIFFUSERS_PREFIX) or not (Path(spec) / CONFIG_FILE).is_file():
        return {}
    try:
        model = load_run_config(Path(spec) / CONFIG_FILE).model
    except (OSError, ValueError):  # a ConfigError is a ValueError
        return {}
    return dict(model.options) if model.backbone == backbone else {}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _describe(tensor: torch.Tensor) -> str:
    return f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def mismatches(source: nn.Module, target: nn.Module) -> list[str]:
    """What keeps ``source``'s tensors from being copied into ``target``'s: names only one of them has,
    and shared names whose shape or dtype differ (empty when they agree)."""
    src, dst = _tensors(source), _tensors(target)
    found = [f"{name}: {_describe(src[name])} in the source, {_describe(t)} in the new model"
             for name, t in dst.items() if name in src and _describe(src[name]) != _describe(t)]
    found += [f"{name}: only in the new model" for name in dst if name not in src]
    found += [f"{name}: only in the source" for name in src if name not in dst]
    return found


@torch.no_grad()
def copy_weights(source: nn.Module, target: nn.Module, where: str = "the source") -> None:
    """Copy every parameter and buffer of ``source`` into ``target`` in place (exact values);
    ``InitializationError`` listing the first mismatches when their names, shapes or dtypes differ."""
    found = mismatches(source, target)
    if found:
        listed = "; ".join(found[:LISTED_MISMATCHES]) + ("; ..." if len(found) > LISTED_MISMATCHES else "")
        raise InitializationError(
            f"train.init_from: the network of {where} does not match this run's ({len(found)} mismatching "
            f"parameters or buffers: {listed}); the backbones must agree: give this run the source run's model "
            "section (backbone and options, model.guidance included)")
    src = _tensors(source)
    for name, tensor in _tensors(target).items():
        tensor.copy_(src[name])


def initialize_from(spec: str, model: FlowMap, shape: tuple[int, ...], num_classes: int,
                    device: Union[str, torch.device] = "cpu") -> FlowMap:
    """Give ``model`` (a fresh run's ``FlowMap`` for samples of ``shape`` with ``num_classes`` classes)
    the EMA weights of the run directory ``spec`` (module docstring); returns the source map, whose
    ``provenance`` says which weights were copied."""
    source = load_source(spec, shape, num_classes, device)
    copy_weights(source, model, spec)
    return source


__all__ = ["InitializationError", "copy_weights", "initialize_from", "load_source", "mismatches",
           "source_model_options"]
