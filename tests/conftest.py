import os

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.oracle import ExactAverageVelocity, Gaussian, GaussianMixture
from flowmaps.schedules import CosineSchedule, LinearSchedule

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def classifier_cache(tmp_path_factory):
    """One feature-classifier cache for the whole run of the suite (``FLOWMAPS_CACHE``, unless the
    environment sets one), shared by pytest-xdist's workers: the Fashion-MNIST classifier is trained
    once per run (its files are written atomically, so two workers that race write the same bytes),
    and never into the user's own cache."""
    if os.environ.get("FLOWMAPS_CACHE"):
        yield os.environ["FLOWMAPS_CACHE"]
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "flowmaps-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("flowmaps-cache")
    os.environ["FLOWMAPS_CACHE"] = str(path)
    yield str(path)
    del os.environ["FLOWMAPS_CACHE"]


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return LinearSchedule() if request.param == "linear" else CosineSchedule()


@pytest.fixture
def gaussian(schedule):
    return Gaussian([0.5, -1.0, 2.0], [0.3, 1.5, 0.7], schedule=schedule)


@pytest.fixture
def exact_gaussian_map(gaussian):
    """A FlowMap whose backbone returns the exact average velocity of the Gaussian (float64)."""
    return FlowMap(ExactAverageVelocity(gaussian))


def small_mixture(schedule=None) -> GaussianMixture:
    return GaussianMixture(
        [0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [[0.3, 0.2], [0.25, 0.4]], schedule=schedule
    )
