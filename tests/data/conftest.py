"""Fixtures of the data tests: where Fashion-MNIST lies (its tests fail under CI=true without it)."""

import os
from pathlib import Path

import pytest

from flowmaps.data.images import fashion_mnist_dir as configured_dir
from flowmaps.data.images import fashion_mnist_files


def require_fashion_mnist() -> Path:
    """The folder of Fashion-MNIST's files. When they are missing a test that needs them fails under
    ``CI=true`` (the project's rule: CI must have the data) and is skipped elsewhere."""
    try:
        fashion_mnist_files()
    except ValueError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have Fashion-MNIST: {err}")
        pytest.skip(str(err))
    return configured_dir()


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    return require_fashion_mnist()
