"""Name -> backbone, chosen by ``model.backbone``, with its options validated by name.

A backbone registers a builder ``build(options, shape, num_classes) -> nn.Module`` (the options
resolved for ``shape``, ``BackboneOptions.resolved``) and its options class (a ``BackboneOptions``
dataclass of ``option(...)`` fields): the network ``net(x, s, t, cond=None) -> V`` predicts the
average velocity, shaped like ``x`` of shape ``[B, *shape]``, for ``FlowMap`` to wrap.
``num_classes > 0`` makes it class-conditional (``cond`` a ``[B]`` integer tensor, ``-1`` or
``cond=None`` the null class of classifier-free training; ``nets.embeddings.ClassEmbedding``).
Every option of the ``model`` section other than ``backbone`` and ``num_classes`` is the backbone's
and is checked against its options class (an unknown name or bad value is a ``ValueError`` naming
it). ``tiny`` gives the options of a small instance, which the registry-driven tests build.
Registering is all a new backbone needs (``docs/extending.md``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import nn

from flowmaps.nets.embeddings import enable_guidance
from flowmaps.options import Options
from flowmaps.train.config import ModelConfig


@dataclass
class BackboneOptions(Options):
    """Base of every backbone's options; ``tiny`` holds the values of a small test instance and
    ``test_shape`` the sample shape the tests give it. ``legacy`` holds the earlier defaults of options
    whose default has changed: a run directory recorded before runs recorded every backbone option
    trained with these (``flowmaps.build.recorded_model``)."""

    kind: ClassVar[str] = "backbone"
    tiny: ClassVar[dict[str, Any]] = {}
    test_shape: ClassVar[tuple[int, ...]] = (3,)
    legacy: ClassVar[dict[str, Any]] = {}

    def resolved(self, shape: tuple[int, ...]) -> "BackboneOptions":
        """These options with every shape-dependent default (``None``) filled in for samples of ``shape``."""
        return self


BackboneBuilder = Callable[[Any, tuple[int, ...], int], nn.Module]


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    build: BackboneBuilder
    options: type[BackboneOptions]

    @property
    def summary(self) -> str:
        return (self.build.__doc__ or "").strip().splitlines()[0] if self.build.__doc__ else ""


_BACKBONES: dict[str, BackboneEntry] = {}


def register_backbone(name: str, options: type[BackboneOptions]) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make ``builder(options, shape, num_classes)`` available as ``model.backbone = name``."""
    def add(builder: BackboneBuilder) -> BackboneBuilder:
        if not name or name in _BACKBONES:
            raise ValueError(f"backbone name {name!r} is empty or already registered")
        if not (isinstance(options, type) and issubclass(options, BackboneOptions)):
            raise TypeError(f"backbone {name!r}: its options must be a BackboneOptions dataclass; got {options!r}")
        _BACKBONES[name] = BackboneEntry(name, builder, options)
        return builder
    return add


def backbone_names() -> list[str]:
    return sorted(_BACKBONES)


def backbone_entry(name: str) -> BackboneEntry:
    if name not in _BACKBONES:
        raise ValueError(f"unknown model.backbone {name!r}; available backbones: {', '.join(backbone_names())}")
    return _BACKBONES[name]


def resolve_backbone_options(name: str, values: dict[str, Any]) -> BackboneOptions:
    """The validated options of backbone ``name``: its defaults overridden by ``values``."""
    cls = backbone_entry(name).options
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"backbone {name!r} has no option(s) {unknown}; its options are {sorted(valid)}")
    resolved = cls(**cls.coerce(values))
    resolved.check(name)
    return resolved


def build_backbone(model: ModelConfig, shape: tuple[int, ...]) -> nn.Module:
    """The network of ``model.backbone`` for samples of shape ``shape`` and ``model.num_classes`` classes;
    with ``model.guidance`` its class embedding also takes the guidance scale (every backbone that
    embeds classes with ``ClassEmbedding`` gets it)."""
    entry = backbone_entry(model.backbone)
    options = resolve_backbone_options(model.backbone, model.options).resolved(tuple(shape))
    net = entry.build(options, tuple(shape), model.num_classes)
    if model.guidance:
        enable_guidance(net)
    return net


__all__ = ["BackboneBuilder", "BackboneEntry", "BackboneOptions", "register_backbone", "backbone_names",
           "backbone_entry", "resolve_backbone_options", "build_backbone"]
