"""Where Fashion-MNIST lies, for the tests that need it: they fail under ``CI=true`` without it (CI must
have the data, the project's rule) and are skipped elsewhere."""

from pathlib import Path

from flowmaps.data.images import fashion_mnist_dir as configured_dir
from flowmaps.data.images import fashion_mnist_files
from tests.unavailable import unavailable


def require_fashion_mnist() -> Path:
    """The folder of Fashion-MNIST's files; a test that needs them fails (CI) or skips when they are missing."""
    try:
        fashion_mnist_files()
    except ValueError as err:
        unavailable("Fashion-MNIST", str(err))
    return configured_dir()
