"""Fixtures of the data tests: where Fashion-MNIST lies (its tests fail under CI=true without it)."""

from pathlib import Path

import pytest

from tests.fashion_mnist import require_fashion_mnist


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    return require_fashion_mnist()
