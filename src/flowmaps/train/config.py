"""The run configuration: one validated schema, loaded from YAML/TOML and CLI overrides.

Every key is checked: unknown keys, wrong types and impossible values raise ``ConfigError`` naming
the key (``optim.lr``, ``train.steps``, ...). This module is a leaf (it imports nothing of flowmaps):
``parse_config`` checks the schema; the method options, which live in the ``method`` section beside
``name``, are checked against the method registry one layer up, by ``flowmaps.build.config_from_dict``
and ``flowmaps.build.load_config``, which every entry point uses.

Sections: ``data``, ``model``, ``method``, ``optim``, ``train``, ``checkpoint``, ``guard``,
``distributed``, ``eval`` and ``teacher``; ``docs/training.md`` explains the training-side keys.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, of the wrong type, or has an impossible value."""


@dataclass
class DataConfig:
    name: str = "checkerboard"  # built-in name, .npy file, or mixture spec .json/.yaml


@dataclass
class ModelConfig:
    backbone: str = "mlp"  # a registered backbone (flowmaps.nets.registry); the keys below are the MLP's
    width: int = 256
    depth: int = 3
    num_freqs: int = 0
    max_freq: float = 8.0
    x_features: int = 0  # random Fourier features of x (nets.embeddings.FourierInputFeatures)
    x_scale: float = 1.0


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # adam | radam | adamw
    lr: float = 2e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # cosine (to 0 at the last step) | constant
    ema_decay: float = 0.999


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 1024
    seed: int = 0
    schedule: str = "linear"  # linear | cosine
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 100
    grad_accum: int = 1  # micro-batches per optimiser step and process (global batch = batch_size)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the network on CUDA (loss and tangents stay fp32)
    compile: bool = False  # torch.compile the network (checked against eager JVP tangents at start)
    tensorboard: bool = False  # also log to RUN_DIR/tensorboard (pip install 'flowmaps[tensorboard]')


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (and one at the end); 0: only on SIGTERM/SIGINT
    keep_last: int = 3  # newest checkpoints kept, besides the best one
    keep_best: bool = True  # also keep the checkpoint with the lowest mean training loss of its interval


@dataclass
class GuardConfig:
    max_strikes: int = 3  # non-finite steps (skipped) before the guard acts
    on_divergence: str = "rollback"  # rollback (to the last good checkpoint, lower lr) | stop
    lr_factor: float = 0.5  # learning-rate multiplier applied at each rollback
    max_rollbacks: int = 2  # rollbacks before the guard stops the run with a report
    spike_factor: float = 0.0  # skip a step whose loss exceeds this x the median of recent losses (0: off; else > 1)
    spike_window: int = 200  # accepted steps whose losses form that median


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    check_steps: int = 3  # first steps whose gradient norms are compared across ranks; 0 disables


@dataclass
class EvalConfig:
    n_samples: int = 16384
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    ode_steps: int = 32
    ode_solver: str = "heun"
    grid_rho: float = 1.0  # flow-map steps on the grid t_k = (1 - k/N)^grid_rho (flowmaps.samplers.time_grid)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "lsd"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teacher: Optional[str] = None  # "exact" (mixture data) or a trained run directory

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "optim.optimizer": ("adam", "radam", "adamw"),
    "optim.lr_schedule": ("cosine", "constant"),
    "train.schedule": ("linear", "cosine"),
    "eval.ode_solver": ("euler", "heun"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "guard.on_divergence": ("rollback", "stop"),
    "distributed.backend": ("auto", "gloo", "nccl"),
}
_POSITIVE = {"model.width", "model.depth", "model.max_freq", "model.x_scale", "optim.lr", "train.steps",
             "train.batch_size", "train.log_every", "eval.n_samples", "eval.ode_steps", "eval.grid_rho",
             "train.grad_accum", "checkpoint.keep_last", "guard.max_strikes", "guard.spike_window"}
_NON_NEGATIVE = {"model.num_freqs", "model.x_features", "optim.weight_decay", "optim.grad_clip", "optim.warmup_steps", "train.seed",
                 "checkpoint.every", "guard.max_rollbacks", "distributed.check_steps"}
_UNIT = {"optim.beta1", "optim.beta2", "optim.ema_decay"}
_SECTIONS = ("data", "model", "optim", "train", "checkpoint", "guard", "distributed", "eval")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if get_origin(typ) is list:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key} must be a non-empty list; got {value!r}")
        (inner,) = get_args(typ)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {typ.__name__}; got {value!r} ({type(value).__name__})")
    return value


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"section {name!r} must be a mapping; got {values!r}")
    hints = get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys: {sorted(hints)}")
    return cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})


def _validate(cfg: Config) -> None:
    for section in _SECTIONS:
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            full = f"{section}.{key}"
            if full in _CHOICES and value not in _CHOICES[full]:
                raise ConfigError(f"{full} must be one of {_CHOICES[full]}; got {value!r}")
            if full in _POSITIVE and not value > 0:
                raise ConfigError(f"{full} must be positive; got {value!r}")
            if full in _NON_NEGATIVE and value < 0:
                raise ConfigError(f"{full} must be non-negative; got {value!r}")
            if full in _UNIT and not 0 <= value < 1:
                raise ConfigError(f"{full} must lie in [0, 1); got {value!r}")
    if not 0 < cfg.guard.lr_factor <= 1:
        raise ConfigError(f"guard.lr_factor must lie in (0, 1]; got {cfg.guard.lr_factor!r}")
    if not (cfg.guard.spike_factor == 0 or cfg.guard.spike_factor > 1):
        raise ConfigError(f"guard.spike_factor must be 0 (off) or above 1; got {cfg.guard.spike_factor!r}")
    if not math.isfinite(cfg.eval.grid_rho):
        raise ConfigError(f"eval.grid_rho must be a finite positive number; got {cfg.eval.grid_rho!r}")
    if any(n < 1 for n in cfg.eval.nfe):
        raise ConfigError(f"eval.nfe entries must be positive step counts; got {cfg.eval.nfe}")
    if not (cfg.train.device in ("auto", "cpu", "cuda") or cfg.train.device.startswith("cuda:")):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {cfg.train.device!r}")
    if not isinstance(cfg.method.get("name"), str):
        raise ConfigError("method.name must be given as a string (see `flowmaps methods`)")
    if cfg.teacher is not None and not isinstance(cfg.teacher, str):
        raise ConfigError(f"teacher must be 'exact' or a run directory; got {cfg.teacher!r}")


def parse_config(values: dict[str, Any]) -> Config:
    """Build a ``Config`` from nested dictionaries (missing keys take defaults) and check its schema; the
    method options are checked by ``flowmaps.build.config_from_dict``."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of sections; got {type(values).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {sorted(sections)}")
    defaults = Config()
    kwargs: dict[str, Any] = {}
    for name, f in sections.items():
        if name == "teacher":
            kwargs[name] = values.get("teacher")
        elif name == "method":
            method = values.get("method", defaults.method)
            if isinstance(method, str):
                method = {"name": method}
            if not isinstance(method, dict):
                raise ConfigError(f"section 'method' must be a mapping or a method name; got {method!r}")
            kwargs[name] = {"name": defaults.method["name"], **method}
        else:
            given = values.get(name) or {}
            if name == "data" and isinstance(given, str):
                given = {"name": given}  # data: checkerboard
            if not isinstance(given, dict):
                raise ConfigError(f"section {name!r} must be a mapping; got {given!r}")
            merged = {**dataclasses.asdict(getattr(defaults, name)), **given}
            kwargs[name] = _build_section(name, type(getattr(defaults, name)), merged)
    cfg = Config(**kwargs)
    _validate(cfg)
    return cfg


def read_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """Parse a ``.yaml``/``.yml``/``.toml`` config file into nested dictionaries."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(path.read_text()) or {}
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot parse config file {path}: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return values


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to nested dictionaries in place."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise ConfigError(f"override {assignment!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    path, raw = assignment.split("=", 1)
    section, key = path.split(".", 1)
    value = yaml.safe_load(raw)
    target = values.setdefault(section, {})
    if isinstance(target, str):  # method: lsd
        target = values[section] = {"name": target}
    if not isinstance(target, dict):
        raise ConfigError(f"cannot set {path}: section {section!r} is not a mapping")
    target[key] = value


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


