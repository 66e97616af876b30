"""Training methods. Importing this package registers every method under its CLI name."""

from flowmaps.methods import diagonal, lagrangian  # noqa: F401  (registration side effect)
from flowmaps.methods import eulerian  # noqa: F401  (registration side effect)
from flowmaps.methods import compositional, consistency  # noqa: F401  (registration side effect)
from flowmaps.methods.base import Batch, LossContext, LossOutput, Method
from flowmaps.methods.registry import build_method, describe_methods, get_method_class, method_names

__all__ = ["Batch", "LossContext", "LossOutput", "Method", "build_method", "describe_methods", "get_method_class", "method_names"]
