"""Documented, validated option dataclasses: the mechanism behind method options and backbone options.

An options class is a dataclass whose fields are declared with ``option(default, doc, choices=... |
within=...)``. ``check(owner)`` validates every field by name (its type from the annotation, that it
is finite, its constraint, then each class's ``check_group``); the error names the option and its
owner (``option lr of method 'lsd'``, ``option channels of backbone 'unet'``). ``docs()`` gives what
``flowmaps methods NAME`` and ``flowmaps backbones NAME`` print. ``kind`` names the owner's kind.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence, Union, get_args, get_origin, get_type_hints


def option(default: Any, doc: str = "", *, choices: Optional[Sequence[Any]] = None, within: str = "") -> Any:
    """A documented option field: ``default``, a one-line ``doc`` (what it is, its paper) and its constraint:
    ``choices`` or ``within``, an interval such as ``"[0, 1)"`` or ``"(0, inf)"``. A subclass that
    re-declares a field keeps the constraint (and the doc, unless it gives its own)."""
    meta = {k: v for k, v in dict(doc=doc, choices=choices, within=within).items() if v}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _type_ok(value: Any, typ: Any) -> bool:
    """Whether ``value`` fits the annotation ``typ`` (int passes for float; bool never for numbers)."""
    if typ is Any:
        return True
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(typ))
    if typ is type(None):
        return value is None
    if origin in (list, tuple, collections.abc.Sequence):
        inner = get_args(typ)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner[0]) for v in value)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _within(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval`` (``"[0, 1)"``: brackets closed, parentheses open)."""
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    return (lo <= value if interval[0] == "[" else lo < value) and (value <= hi if interval[-1] == "]" else value < hi)


def require(ok: bool, method: str, name: str, what: str, value: Any, kind: str = "method") -> None:
    """``ValueError`` naming ``name`` of ``method`` (a ``kind``) and the constraint ``what`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} of {kind} {method!r} must {what}; got {value!r}")


@dataclass
class Options:
    """Base of every options class: field docs, constraints and validation by name."""

    kind: ClassVar[str] = "method"

    @classmethod
    def metadata(cls, name: str) -> dict[str, Any]:
        """The doc and constraint of option ``name``, merged over the classes that declare it."""
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            f = getattr(klass, "__dataclass_fields__", {}).get(name)
            if f is not None:
                merged.update(f.metadata)
        return merged

    def check(self, method: str) -> None:
        """Check every field's type and constraint, then each class's ``check_group`` (the constraints
        between fields); a failure is a ``ValueError`` naming the option."""
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), self.metadata(f.name)
            if not _type_ok(value, hints[f.name]):
                typ = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
                raise ValueError(f"option {f.name} of {self.kind} {method!r} must be of type {typ}; got "
                                 f"{value!r} ({type(value).__name__})")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"option {f.name} of {self.kind} {method!r} must be finite; got {value!r}")
            if "choices" in meta and value not in meta["choices"]:
                require(False, method, f.name, f"be one of {tuple(meta['choices'])}", value, self.kind)
            if "within" in meta and value is not None:
                require(_within(value, meta["within"]), method, f.name, f"lie in {meta['within']}", value, self.kind)
        for klass in reversed(type(self).__mro__):
            group_check = klass.__dict__.get("check_group")
            if group_check is not None:
                group_check(self, method)

    @classmethod
    def coerce(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with numeric strings turned into floats where a field is a number (YAML reads ``1e-3``
        as a string)."""
        hints = get_type_hints(cls)
        out = dict(values)
        for name, value in values.items():
            if isinstance(value, str) and name in hints and _type_ok(1.5, hints[name]) and not _type_ok(value, hints[name]):
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    @classmethod
    def docs(cls) -> dict[str, str]:
        """``{field: doc}`` for every option, with its constraint."""
        out = {}
        for f in dataclasses.fields(cls):
            meta = cls.metadata(f.name)
            rule = f" (one of {', '.join(map(str, meta['choices']))})" if "choices" in meta else \
                f" (in {meta['within']})" if "within" in meta else ""
            out[f.name] = meta.get("doc", "") + rule
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{field: default}`` for every option."""
        return dataclasses.asdict(cls())


__all__ = ["Options", "option", "require"]
