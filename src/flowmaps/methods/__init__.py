"""Training methods. Importing this package imports every module of its family folders, which
registers each method under its CLI name: a new method is a new file, with nothing else to edit
(``docs/extending.md``)."""

import importlib
import pkgutil

from flowmaps.methods.base import Batch, LossContext, LossOutput, Method
from flowmaps.methods.registry import (
    build_method, describe_methods, get_method_class, method_names, method_options, option_docs, register,
    register_preset,
)

for _module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    importlib.import_module(_module.name)

__all__ = ["Batch", "LossContext", "LossOutput", "Method", "build_method", "describe_methods", "get_method_class",
           "method_names", "method_options", "option_docs", "register", "register_preset"]
