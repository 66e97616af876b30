"""The run configuration: one validated schema, loaded from YAML/TOML and CLI overrides.

Every key is checked: unknown keys, wrong types and impossible values raise ``ConfigError`` naming
the key (``optim.lr``, ``train.steps``, ...). This module is a leaf (it imports nothing of flowmaps):
``parse_config`` checks the schema; the method options, which live in the ``method`` section beside
``name``, are checked against the method registry one layer up, by ``flowmaps.build.config_from_dict``
and ``flowmaps.build.load_config``, which every entry point uses.

Sections: ``data``, ``model``, ``method``, ``optim``, ``train``, ``checkpoint``, ``guard``,
``distributed``, ``eval``, ``guidance`` and ``teacher``; ``docs/training.md`` explains the training-side keys.

Files and ``--set`` values are parsed strictly (``parse_yaml``, also used for mixture specs): a file
larger than ``FILE_LIMIT`` bytes is refused before it is read, a YAML mapping may not repeat a key
(the last one would silently win), and a parsed value may not expand to more than ``VALUE_LIMIT``
values or nest deeper than ``DEPTH_LIMIT`` levels, so a few lines of nested YAML aliases cannot turn
into billions of nodes. Every float must be finite (``optim.lr=inf`` or ``optim.grad_clip=.nan``
are refused by name).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


FILE_LIMIT = 2**20  # bytes of a config file or mixture spec
VALUE_LIMIT = 100_000  # values (scalars, lists, mappings) a parsed file may expand to, aliases counted each time
DEPTH_LIMIT = 64  # nesting levels of a parsed file


class ConfigError(ValueError):
    """A configuration key is unknown, of the wrong type, or has an impossible value, or a config file
    cannot be read or parsed."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (merge keys ``<<`` may be
    overridden, as YAML intends)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def check_expansion(value: Any, where: str) -> None:
    """``ConfigError`` unless ``value`` expands to at most ``VALUE_LIMIT`` values within ``DEPTH_LIMIT``
    levels (shared objects, as YAML aliases make them, count once per appearance; stops early)."""
    stack, count = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > VALUE_LIMIT:
            raise ConfigError(f"{where} expands to more than {VALUE_LIMIT} values (nested YAML aliases?)")
        if depth > DEPTH_LIMIT:
            raise ConfigError(f"{where} nests deeper than {DEPTH_LIMIT} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


def parse_yaml(text: str, where: str) -> Any:
    """The value of YAML ``text``, parsed strictly (module docstring); ``ConfigError`` naming ``where``."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {where}: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"cannot parse {where}: it nests too deeply") from err
    check_expansion(value, where)
    return value


def read_text_limited(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` if it is a file of at most ``FILE_LIMIT`` bytes; ``ConfigError`` otherwise."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError(f"{what} {path} is not a file")
        if size > FILE_LIMIT:
            raise ConfigError(f"{what} {path} has {size} bytes; at most {FILE_LIMIT} are read")
        return path.read_bytes()[: FILE_LIMIT + 1].decode()
    except FileNotFoundError as err:
        raise ConfigError(f"{what} {path} does not exist") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text: {err}") from err
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from err


@dataclass
class DataConfig:
    name: str = "checkerboard"  # built-in name, .npy file, or mixture spec .json/.yaml


@dataclass
class ModelConfig:
    """``backbone`` and ``num_classes``; every other key of the ``model`` section is the backbone's own
    option (``options``, written flat in the file: ``model: {backbone: unet, channels: 64}``), checked
    against the backbone's options class by ``flowmaps.build``."""

    backbone: str = "mlp"  # a registered backbone (flowmaps.nets.registry; `flowmaps backbones`)
    num_classes: int = 0  # 0: unconditional; K: class-conditional on labels 0..K-1 (and a null class)
    options: dict[str, Any] = field(default_factory=dict)
    guidance: bool = False  # the guidance scale w as an input, F(x, s, t, c, w) (train.guidance_range draws it)

    def to_dict(self) -> dict[str, Any]:
        extra = {"guidance": True} if self.guidance else {}  # absent when off: older runs' records stay equal
        return {"backbone": self.backbone, "num_classes": self.num_classes, **extra, **self.options}


DEFAULT_LR = 2e-3


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # adam | radam | adamw
    lr: Optional[float] = None  # None: the method's rate for the backbone (Method.backbone_defaults), else DEFAULT_LR
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # cosine (to 0 at the last step) | constant
    ema_decay: float = 0.999


@dataclass
class TrainConfig:
    steps: int = 7000
    batch_size: int = 512
    seed: int = 0
    schedule: str = "linear"  # linear | cosine
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 100
    grad_accum: int = 1  # micro-batches per optimiser step and process (global batch = batch_size)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the network on CUDA (loss and tangents stay fp32)
    compile: bool = False  # torch.compile the network (checked against eager JVP tangents at start)
    tensorboard: bool = False  # also log to RUN_DIR/tensorboard (pip install 'flowmaps[tensorboard]')
    label_dropout: float = 0.1  # share of labels dropped to the null class (classifier-free training; model.num_classes > 0)
    guidance_range: Optional[list[float]] = None  # [low, high]: a guidance scale w per example (model.guidance)
    guidance_draw: str = "uniform"  # uniform: w ~ U[low, high] | gft: w = 1/beta, beta ~ U[1/high, 1/low], weight beta^2
    init_from: Optional[str] = None  # a finished run whose EMA weights start a fresh run (flowmaps.train.initialization)


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
class GuidanceConfig:
    """Guidance of a distillation teacher (spec §7; ``flowmaps.teachers.guidance``)."""

    teacher_scale: float = 1.0  # w of the teacher's classifier-free guidance (1: the conditional teacher, 0: unconditional)
    weak_teacher: Optional[str] = None  # autoguidance: a weaker run of the same condition replaces the unconditional


@dataclass
class EvalConfig:
    n_samples: Optional[int] = None  # None: 65536 for vectors (Boffi et al.'s 64k histogram KL), 1000 for images
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    ode_steps: int = 16  # Heun steps of the diagonal's ODE baseline (2 NFE each)
    ode_solver: str = "heun"
    # flow-map steps on the grid t_k = (1 - k/N)^grid_rho (flowmaps.samplers.time_grid); None: the model's
    # grid_rho, its method's (the grids its grid distillation trains), else 1
    grid_rho: Optional[float] = None
    # Inception FID beside the classifier metrics (image data; the fid extra, flowmaps.metrics.inception)
    inception_fid: bool = False

    def sample_count(self, shape: tuple[int, ...]) -> int:
        """``n_samples``, or where it is None 65536 for vector data and 1000 for images (``shape``: one sample's)."""
        return self.n_samples if self.n_samples is not None else 65536 if len(shape) == 1 else 1000


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
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    teacher: Optional[str] = None  # "exact" (mixture data) or a trained run directory

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["model"] = self.model.to_dict()
        return values


_CHOICES = {
    "optim.optimizer": ("adam", "radam", "adamw"),
    "optim.lr_schedule": ("cosine", "constant"),
    "train.schedule": ("linear", "cosine"),
    "eval.ode_solver": ("euler", "heun"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.guidance_draw": ("uniform", "gft"),
    "guard.on_divergence": ("rollback", "stop"),
    "distributed.backend": ("auto", "gloo", "nccl"),
}
_POSITIVE = {"optim.lr", "train.steps",
             "train.batch_size", "train.log_every", "eval.n_samples", "eval.ode_steps", "eval.grid_rho",
             "train.grad_accum", "checkpoint.keep_last", "guard.max_strikes", "guard.spike_window"}
_NON_NEGATIVE = {"model.num_classes", "guidance.teacher_scale", "optim.weight_decay", "optim.grad_clip", "optim.warmup_steps", "train.seed",
                 "checkpoint.every", "guard.max_rollbacks", "distributed.check_steps"}
_UNIT = {"optim.beta1", "optim.beta2", "optim.ema_decay", "train.label_dropout"}
_SECTIONS = ("data", "optim", "train", "checkpoint", "guard", "distributed", "eval", "guidance")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if get_origin(typ) is Union:  # Optional[X]
        (inner,) = [a for a in get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(key, value, inner)
    if get_origin(typ) is list:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key} must be a non-empty list; got {value!r}")
        (inner,) = get_args(typ)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            value = float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {typ.__name__}; got {value!r} ({type(value).__name__})")
    if typ is float and not math.isfinite(value):
        kind = "finite positive" if key in _POSITIVE else "finite non-negative" if key in _NON_NEGATIVE else "finite"
        raise ConfigError(f"{key} must be a {kind} number; got {value!r}")
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
            if full in _POSITIVE and value is not None and not value > 0:
                raise ConfigError(f"{full} must be positive; got {value!r}")
            if full in _NON_NEGATIVE and value < 0:
                raise ConfigError(f"{full} must be non-negative; got {value!r}")
            if full in _UNIT and not 0 <= value < 1:
                raise ConfigError(f"{full} must lie in [0, 1); got {value!r}")
    if not 0 < cfg.guard.lr_factor <= 1:
        raise ConfigError(f"guard.lr_factor must lie in (0, 1]; got {cfg.guard.lr_factor!r}")
    if not (cfg.guard.spike_factor == 0 or cfg.guard.spike_factor > 1):
        raise ConfigError(f"guard.spike_factor must be 0 (off) or above 1; got {cfg.guard.spike_factor!r}")
    if any(n < 1 for n in cfg.eval.nfe):
        raise ConfigError(f"eval.nfe entries must be positive step counts; got {cfg.eval.nfe}")
    if not (cfg.train.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.train.device)):
        raise ConfigError(
            f"train.device must be auto, cpu, cuda or cuda:N (N a device index); got {cfg.train.device!r}")
    if not isinstance(cfg.method.get("name"), str):
        raise ConfigError("method.name must be given as a string (see `flowmaps methods`)")
    if cfg.teacher is not None and not isinstance(cfg.teacher, str):
        raise ConfigError(f"teacher must be 'exact' or a run directory; got {cfg.teacher!r}")
    guided = cfg.guidance.teacher_scale != 1.0 or cfg.guidance.weak_teacher is not None
    if guided and cfg.teacher is None:
        raise ConfigError("guidance.teacher_scale / guidance.weak_teacher guide a distillation teacher; give one "
                          "with --teacher (exact or a run directory)")
    _validate_guidance_range(cfg)
    if guided and cfg.model.num_classes == 0:
        raise ConfigError("guidance needs a class-conditional model (model.num_classes > 0) and labelled data: "
                          "it mixes the teacher's conditional and unconditional velocities")


def _validate_guidance_range(cfg: Config) -> None:
    """``train.guidance_range`` and ``model.guidance`` come together, on a class-conditional model."""
    scales = cfg.train.guidance_range
    if scales is not None and (len(scales) != 2 or not 0 <= scales[0] <= scales[1]):
        raise ConfigError(f"train.guidance_range must be [low, high] with 0 <= low <= high; got {scales}")
    if cfg.train.guidance_draw == "gft" and (scales is None or scales[0] <= 0):
        raise ConfigError(f"train.guidance_draw 'gft' draws beta = 1 / w in [1 / high, 1 / low]: it needs "
                          f"train.guidance_range with low > 0; got {scales}")
    if (scales is not None) != cfg.model.guidance:
        raise ConfigError("model.guidance (the scale w as a network input) and train.guidance_range (the scales "
                          "it is trained on) must be given together")
    if cfg.model.guidance and cfg.model.num_classes == 0:
        raise ConfigError("model.guidance needs a class-conditional model (model.num_classes > 0)")
    if scales is not None and cfg.guidance.teacher_scale != 1.0:
        raise ConfigError("guidance.teacher_scale is for a fixed-scale teacher; with train.guidance_range every "
                          "example's own scale guides the teacher")


def _model_section(values: Any) -> ModelConfig:
    """``ModelConfig`` of the flat ``model`` section: ``backbone``, ``num_classes``, the backbone's options."""
    if isinstance(values, str):
        values = {"backbone": values}  # model: unet
    if not isinstance(values, dict):
        raise ConfigError(f"section 'model' must be a mapping or a backbone name; got {values!r}")
    options = {k: v for k, v in values.items() if k not in ("backbone", "num_classes", "guidance")}
    if any(not isinstance(k, str) for k in options):
        raise ConfigError(f"model option names must be strings; got {sorted(map(repr, options))}")
    backbone = values.get("backbone", "mlp")
    if not isinstance(backbone, str):
        raise ConfigError(f"model.backbone must be a backbone name; got {backbone!r}")
    num_classes = _coerce("model.num_classes", values.get("num_classes", 0), int)
    if num_classes < 0:
        raise ConfigError(f"model.num_classes must be non-negative (0: unconditional); got {num_classes}")
    guidance = _coerce("model.guidance", values.get("guidance", False), bool)
    return ModelConfig(backbone, num_classes, options, guidance)


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
        elif name == "model":
            kwargs[name] = _model_section(values.get("model") or {})
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
    """Parse a ``.yaml``/``.yml``/``.toml`` config file into nested dictionaries, strictly (module docstring)."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    text = read_text_limited(path, "config file")
    if path.suffix == ".toml":
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"cannot parse config file {path}: {err}") from err
        except RecursionError as err:
            raise ConfigError(f"cannot parse config file {path}: it nests too deeply") from err
        check_expansion(values, f"config file {path}")
    else:
        values = parse_yaml(text, f"config file {path}")
        values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return values


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to nested dictionaries in place."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise ConfigError(f"override {assignment!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    path, raw = assignment.split("=", 1)
    section, key = path.split(".", 1)
    value = parse_yaml(raw, f"the value of --set {assignment}")
    target = values.setdefault(section, {})
    if isinstance(target, str):  # method: lsd
        target = values[section] = {"name": target}
    if not isinstance(target, dict):
        raise ConfigError(f"cannot set {path}: section {section!r} is not a mapping")
    target[key] = value


def config_text(cfg: Config) -> str:
    """The resolved config as YAML (what ``config.yaml`` of a run holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    Path(path).write_text(config_text(cfg))


