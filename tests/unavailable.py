"""What a test does when something it needs (an extra, a data set, a program) is missing: it fails under
``CI=true``, since CI installs everything the tests use, and is skipped elsewhere."""

import os
from typing import NoReturn

import pytest


def unavailable(what: str, message: str) -> NoReturn:
    """Fail (``CI=true``: CI must have ``what``) or skip, saying ``message``."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must have {what}: {message}")
    pytest.skip(message)
