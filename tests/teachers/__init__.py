"""Tests of ``flowmaps.teachers``; ``require_diffusers`` for the tests that need diffusers: they fail under
``CI=true`` without it (CI installs the ``diffusers`` extra) and are skipped elsewhere."""

from types import ModuleType

from tests.unavailable import unavailable


def require_diffusers() -> ModuleType:
    """The ``diffusers`` module; a test that needs it fails (CI) or skips when it is not installed."""
    try:
        import diffusers
    except ImportError as err:
        unavailable("diffusers", f"diffusers is not installed (pip install flowmaps[diffusers]): {err}")
    return diffusers
