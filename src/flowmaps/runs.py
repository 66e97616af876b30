"""Run directories: what ``flowmaps train`` writes and ``flowmaps.load`` reads.

A run directory holds ``config.yaml`` (resolved), ``model.safetensors`` (raw weights),
``model_ema.safetensors`` (EMA weights), ``data_info.json`` (data dimension), ``train_log.jsonl``,
``metrics.json``, ``metrics.md`` and ``samples.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

from flowmaps.build import build_model, load_config, resolve_device
from flowmaps.flow_map import FlowMap
from flowmaps.methods import get_method_class
from flowmaps.train.checkpoint import load_weights

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "model_ema.safetensors"
DATA_INFO_FILE = "data_info.json"


def load(run_dir: Union[str, Path], ema: bool = True, device: Union[str, torch.device] = "cpu") -> FlowMap:
    """The trained ``FlowMap`` of a run (EMA weights by default), in eval mode, callable as ``model(x, s, t)``;
    its ``sampler`` is its method's (``flowmaps.samplers.sample(model, noise, steps)`` uses it)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a flowmaps run directory (no {CONFIG_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE)
    info = json.loads((run_dir / DATA_INFO_FILE).read_text())
    model = build_model(cfg, int(info["dim"])).to(resolve_device(str(device)))
    model.sampler = get_method_class(cfg.method["name"]).sampler
    load_weights(model, run_dir / (EMA_WEIGHTS_FILE if ema else WEIGHTS_FILE))
    return model.eval().requires_grad_(False)
