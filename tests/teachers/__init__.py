"""Tests of ``flowmaps.teachers``; ``require_diffusers`` for the tests that need diffusers: they fail under
``CI=true`` without it (CI installs the ``diffusers`` extra) and are skipped elsewhere."""

import os
from types import ModuleType

import pytest


def require_diffusers() -> ModuleType:
    """The ``diffusers`` module; a test that needs it fails (CI) or skips when it is not installed."""
    try:
        import diffusers
    except ImportError as err:
        message = f"diffusers is not installed (pip install flowmaps[diffusers]): {err}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have diffusers: {message}")
        pytest.skip(message)
    return diffusers
