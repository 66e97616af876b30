"""Name -> method class, with the metadata that ``flowmaps methods`` prints."""

from __future__ import annotations

import inspect
from typing import Any, Optional

from flowmaps.methods.base import Method
from flowmaps.schedules import Schedule

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(method_names())}")
    return _REGISTRY[name]


def method_options(name: str) -> dict[str, Any]:
    """The keyword options of a method with their defaults (the schedule is supplied separately)."""
    params = inspect.signature(get_method_class(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "schedule", "teacher")}


def build_method(name: str, schedule: Schedule, teacher: Optional[Any] = None, **options: Any) -> Method:
    """Instantiate method ``name``; unknown options raise an error that lists the valid ones.

    A method that needs a teacher refuses to start without one; a teacher given to a method that
    uses none is an error too (it would be silently ignored).
    """
    cls = get_method_class(name)
    valid = method_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(valid)}")
    if cls.needs_teacher:
        if teacher is None:
            raise ValueError(
                f"method {name!r} distils a teacher: pass --teacher RUN_DIR (a trained run) "
                "or --teacher exact (Gaussian-mixture data)"
            )
        return cls(schedule, teacher=teacher, **options)
    if teacher is not None:
        raise ValueError(f"method {name!r} ({cls.setting}) uses no teacher; remove --teacher")
    return cls(schedule, **options)


def describe_methods() -> list[dict[str, Any]]:
    """One row per method: name, rule, setting, cost and the first line of its docstring."""
    rows = []
    for name in method_names():
        cls = _REGISTRY[name]
        summary = (inspect.getdoc(cls) or "").splitlines()[0]
        rows.append(dict(name=name, rule=cls.rule, setting=cls.setting, cost=cls.cost, summary=summary))
    return rows


__all__ = ["register", "build_method", "get_method_class", "method_names", "describe_methods"]
