import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.oracle import ExactAverageVelocity, Gaussian, GaussianMixture
from flowmaps.schedules import CosineSchedule, LinearSchedule

torch.set_num_threads(1)


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
