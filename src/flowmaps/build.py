"""Build the objects a run needs from its config: the validated config itself, the model, the device.

``config_from_dict`` / ``load_config`` are the entry points every command uses: the config module's
schema check (``flowmaps.train.config.parse_config``), then the method's options against the method
registry (``flowmaps.methods``), both raising ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

from flowmaps.flow_map import FlowMap
from flowmaps.memory import check_fits
from flowmaps.methods import Method, build_method, get_method_class
from flowmaps.nets import backbone_entry, build_backbone, resolve_backbone_options
from flowmaps.schedules import get_schedule
from flowmaps.train import tensorboard
from flowmaps.train.config import DEFAULT_LR, Config, ConfigError, parse_config, read_config_file


def check_backbone(cfg: Config) -> None:
    """``cfg.model.backbone`` must be a registered backbone and the other ``model`` keys its options."""
    try:
        resolve_backbone_options(cfg.model.backbone, cfg.model.options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from err


def configured_method_options(cfg: Config) -> dict[str, Any]:
    """The options ``cfg`` gives its method, with the method's preset for ``cfg``'s backbone
    (``Method.backbone_presets``) where the config names no preset."""
    options = {k: v for k, v in cfg.method.items() if k != "name"}
    try:
        preset = get_method_class(cfg.method["name"]).backbone_presets.get(cfg.model.backbone)
    except ValueError:
        return options  # an unknown method: building it names the error
    return options if preset is None or "preset" in options else {"preset": preset, **options}


def check_method(cfg: Config) -> None:
    """Build ``cfg``'s method once to check its name and options (a placeholder stands in for the teacher)."""
    options = configured_method_options(cfg)
    try:
        teacher = object() if cfg.teacher is not None else None
        build_method(cfg.method["name"], get_schedule(cfg.train.schedule), teacher=teacher, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method: {err}") from err


def config_from_dict(values: dict[str, Any]) -> Config:
    """A ``Config`` from nested dictionaries (missing keys take defaults), schema and method options checked."""
    cfg = parse_config(values)
    check_backbone(cfg)
    check_method(cfg)
    if cfg.train.tensorboard:
        try:
            tensorboard.check_available()
        except ImportError as err:
            raise ConfigError(str(err)) from err
    return cfg


def load_config(path: Union[str, Path]) -> Config:
    """The checked ``Config`` of a YAML or TOML file."""
    return config_from_dict(read_config_file(path))


def resolve_config(cfg: Config, shape: tuple[int, ...], method: Optional[Method] = None,
                   inherited: Optional[dict[str, Any]] = None) -> Config:
    """``cfg`` with the defaults that depend on the method, the backbone and the data filled in. Where
    the config leaves them unset, backbone options take the ``inherited`` ones (those of the run it
    starts from, ``train.init_from``), then the built ``method``'s ``backbone_defaults`` for ``cfg``'s
    backbone, then the backbone's own (shape-dependent ones resolved for samples of ``shape``); and
    ``optim.lr`` the method's, else ``DEFAULT_LR``. Every method option is filled in too. A run records
    this, so a later change of a default cannot alter what it means."""
    tuned = dict(method.backbone_defaults.get(cfg.model.backbone, {})) if method is not None else {}
    tuned_lr = tuned.pop("lr", DEFAULT_LR)
    given = {**tuned, **(inherited or {}), **cfg.model.options}
    options = resolve_backbone_options(cfg.model.backbone, given).resolved(tuple(shape))
    lr = cfg.optim.lr if cfg.optim.lr is not None else tuned_lr
    section = cfg.method if method is None else {"name": cfg.method["name"], **dataclasses.asdict(method.options)}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, options=dataclasses.asdict(options)),
                               optim=dataclasses.replace(cfg.optim, lr=lr), method=section)


def recorded_model(model: Any) -> Any:
    """A recorded ``model`` section (a run's ``config.yaml``, an export's config). Runs record every
    backbone option (``resolve_config``); a record that lacks some predates that, and its missing options
    take the defaults it trained with (the backbone's ``legacy``)."""
    section = {"backbone": model} if isinstance(model, str) else dict(model) if isinstance(model, dict) else {}
    try:
        options = backbone_entry(section.get("backbone", "mlp")).options
    except ValueError:
        return model  # an unknown backbone: config_from_dict names it
    if {f.name for f in dataclasses.fields(options)} <= section.keys():
        return model
    return {**options.legacy, **section}


def read_run_config(path: Union[str, Path]) -> dict[str, Any]:
    """The sections of a run directory's ``config.yaml`` at ``path``, its model as ``recorded_model``."""
    values = read_config_file(path)
    return {**values, "model": recorded_model(values.get("model"))}


def load_run_config(path: Union[str, Path]) -> Config:
    """The checked ``Config`` of a run directory's ``config.yaml`` (``read_run_config``)."""
    return config_from_dict(read_run_config(path))


def build_model(cfg: Config, shape: Union[int, tuple[int, ...]]) -> FlowMap:
    """A ``FlowMap`` over the ``model.backbone`` network for samples of shape ``shape`` (an int: vectors
    of that dimension). The network is first built on the ``meta`` device (shapes only): one the CPU
    cannot hold is a ``MemoryLimitError`` naming its size before anything is allocated; a shape the
    backbone cannot take is a ``ValueError`` naming it."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    with torch.device("meta"):
        shapes = build_backbone(cfg.model, shape)
    nbytes = sum(t.numel() * t.element_size() for t in (*shapes.parameters(), *shapes.buffers()))
    m = cfg.model
    check_fits(nbytes, torch.device("cpu"), f"a {m.backbone} model ({m.to_dict()}) on data of shape {list(shape)}")
    scales = cfg.train.guidance_range
    return FlowMap(build_backbone(cfg.model, shape), shape=shape, num_classes=m.num_classes,
                   guidance_range=None if scales is None else (scales[0], scales[1]))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` name a device.
    Any other string, or a CUDA device this machine lacks, is a ``ValueError`` naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda or cuda:N (N a device index)")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return device
