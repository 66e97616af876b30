"""The compositional-rule residual of a map, measured on data."""

import pytest
import torch

from flowmaps.diagnostics import composition_error
from flowmaps.flow_map import FlowMap
from flowmaps.nets import MLP
from tests.methods.exact_models import exact_model


def _data(gaussian, n=2048):
    return gaussian.sample(n, torch.Generator().manual_seed(0)).double()


def test_exact_map_composes(gaussian):
    g = torch.Generator().manual_seed(1)
    errors = composition_error(exact_model(gaussian), _data(gaussian), gaussian.schedule, g)
    assert set(errors) == {"mse", "relative", "mse_noise_to_data", "relative_noise_to_data"}
    assert max(errors.values()) < 1e-20


def test_time_reversed_map_composes_but_a_sign_flipped_one_does_not(gaussian):
    """The rule checks flow-map structure, not the data: the reversed ODE's map composes exactly."""
    data, g = _data(gaussian), torch.Generator().manual_seed(1)
    assert composition_error(exact_model(gaussian, "time_reversed"), data, gaussian.schedule, g)["mse"] < 1e-20
    bad = composition_error(exact_model(gaussian, "sign_flipped"), data, gaussian.schedule, g)
    assert bad["relative"] > 1e-2 and bad["relative_noise_to_data"] > 1e-2


def test_untrained_network_does_not_compose(gaussian):
    torch.manual_seed(0)
    model = FlowMap(MLP(3, width=32, depth=2)).double()
    errors = composition_error(model, _data(gaussian), gaussian.schedule, torch.Generator().manual_seed(1))
    assert errors["relative"] > 1e-3 and errors["mse_noise_to_data"] > 1e-4


def test_empty_data_is_rejected(gaussian):
    with pytest.raises(ValueError, match="at least one data point"):
        composition_error(exact_model(gaussian), torch.zeros(0, 3, dtype=torch.float64), gaussian.schedule)
