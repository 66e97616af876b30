"""Name -> method, with the metadata that ``flowmaps methods`` prints.

A name is a method class (``register``) or a named option set of one (``register_preset``: iCT is CT
with the iCT recipe, PSD-M is PSD with the midpoint split). Options are validated by name against
the class's ``Options`` dataclass (``flowmaps.methods.options``).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from flowmaps.methods.base import Method
from flowmaps.schedules import Schedule


@dataclass(frozen=True)
class MethodEntry:
    """A registered name: the class, the option values that differ from its defaults, and a summary line."""

    name: str
    cls: type[Method]
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


_REGISTRY: dict[str, MethodEntry] = {}


def _add(entry: MethodEntry) -> None:
    if not entry.name or entry.name in _REGISTRY:
        raise ValueError(f"method name {entry.name!r} is empty or already registered")
    fields = {f.name for f in dataclasses.fields(entry.cls.Options)}
    unknown = sorted(set(entry.defaults) - fields)
    if unknown:
        raise ValueError(f"method {entry.name!r}: {entry.cls.__name__} has no option(s) {unknown}")
    if entry.cls.presets and "preset" not in fields:
        raise ValueError(f"method {entry.name!r} has presets but its options have no 'preset' field")
    stray = sorted(set(entry.cls.backbone_presets.values()) - set(entry.cls.presets))
    if stray:
        raise ValueError(f"method {entry.name!r}: backbone_presets names unknown preset(s) {stray}")
    _REGISTRY[entry.name] = entry


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    _add(MethodEntry(cls.name, cls, {}, (inspect.getdoc(cls) or "").splitlines()[0] if cls.__doc__ else ""))
    return cls


def register_preset(name: str, cls: type[Method], options: dict[str, Any], summary: str) -> None:
    """Register ``name``: ``cls`` with ``options`` as its defaults (a named recipe, not a subclass)."""
    _add(MethodEntry(name, cls, dict(options), summary))


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> MethodEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(method_names())}")
    return _REGISTRY[name]


def get_method_class(name: str) -> type[Method]:
    return _entry(name).cls


def method_options(name: str) -> dict[str, Any]:
    """The options of method ``name`` with their defaults."""
    entry = _entry(name)
    return {**entry.cls.Options.defaults(), **entry.defaults}


def option_docs(name: str) -> dict[str, str]:
    """``{option: doc}`` of method ``name``."""
    return _entry(name).cls.Options.docs()


def resolve_options(name: str, **options: Any) -> Any:
    """The validated options object of method ``name``: its defaults, then its preset's values (for
    methods with ``presets``), then ``options``. Unknown names and bad values raise ``ValueError``."""
    entry = _entry(name)
    cls = entry.cls
    valid = method_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(valid)}")
    values = {**entry.defaults, **cls.Options.coerce(options)}
    if cls.presets:
        preset = values.get("preset", valid["preset"])
        if preset not in cls.presets:
            raise ValueError(f"method {name!r} has no preset {preset!r}; its presets are {sorted(cls.presets)}")
        values = {**cls.presets[preset], **values}
    resolved = cls.Options(**values)
    resolved.check(name)
    return resolved


def build_method(name: str, schedule: Schedule, teacher: Optional[Any] = None, **options: Any) -> Method:
    """Instantiate method ``name``; unknown options raise an error that lists the valid ones.

    A method that needs a teacher refuses to start without one; a teacher given to a method that
    uses none is an error too (it would be silently ignored).
    """
    entry = _entry(name)
    resolved = resolve_options(name, **options)
    if entry.cls.needs_teacher and teacher is None:
        raise ValueError(f"method {name!r} distils a teacher: pass --teacher RUN_DIR (a trained run) "
                         "or --teacher exact (Gaussian-mixture data)")
    if not entry.cls.needs_teacher and teacher is not None:
        raise ValueError(f"method {name!r} ({entry.cls.setting}) uses no teacher; remove --teacher")
    method = entry.cls(schedule, resolved, teacher)
    method.name = name
    return method


def describe_methods() -> list[dict[str, Any]]:
    """One row per method: name, rule, setting, cost, sampler and its summary line."""
    return [dict(name=e.name, rule=e.cls.rule, setting=e.cls.setting, cost=e.cls.cost, sampler=e.cls.sampler,
                 summary=e.summary) for e in (_REGISTRY[n] for n in method_names())]


__all__ = ["MethodEntry", "register", "register_preset", "build_method", "resolve_options", "get_method_class",
           "method_names", "method_options", "option_docs", "describe_methods"]
