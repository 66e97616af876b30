import pytest
import torch

from flowmaps.data import MixtureData
from flowmaps.evaluation import evaluate, metrics_table
from flowmaps.flow_map import FlowMap
from flowmaps.oracle import ExactAverageVelocity
from flowmaps.train.config import EvalConfig
from tests.conftest import small_mixture


@pytest.mark.parametrize("sampler", ["flow_map", "consistency", "one_step"])
def test_exact_map_scores_at_the_floor(sampler):
    mix = small_mixture()
    model = FlowMap(ExactAverageVelocity(mix))
    cfg = EvalConfig(n_samples=1500, nfe=[1, 2], ode_steps=16, ode_solver="heun")
    results, panels = evaluate(model, MixtureData("mix", mix), cfg, seed=0, device=torch.device("cpu"),
                               sampler=sampler, schedule=mix.schedule)
    floor = results["floor (two data samples)"]["energy_distance"]
    noise = results["noise (untrained scale)"]["energy_distance"]
    rows = [k for k in results if k.startswith(("flow map", "consistency", "one step"))]
    assert len(rows) == (1 if sampler == "one_step" else 2)
    for k in rows:
        assert results[k]["energy_distance"] < 3 * floor + 0.002 < noise / 10, k
    assert any(k.startswith("ODE") for k in results) == (sampler == "flow_map")
    assert "| sampler | NFE |" in metrics_table(results)
    assert set(panels) >= {"data", "1 step"}


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        evaluate(None, None, EvalConfig(), 0, torch.device("cpu"), sampler="magic")


def test_grid_rho_samples_on_the_power_grid():
    """``eval.grid_rho`` composes the map over ``time_grid(k, rho)``: the exact map still scores at the
    floor, and the rows say which grid they used."""
    mix = small_mixture()
    model = FlowMap(ExactAverageVelocity(mix))
    cfg = EvalConfig(n_samples=1500, nfe=[1, 4], ode_steps=16, ode_solver="heun", grid_rho=2.0)
    results, _ = evaluate(model, MixtureData("mix", mix), cfg, seed=0, device=torch.device("cpu"), schedule=mix.schedule)
    floor = results["floor (two data samples)"]["energy_distance"]
    for k in ("flow map, 1 step", "flow map, 4 steps (grid rho 2)"):
        assert results[k]["energy_distance"] < 3 * floor + 0.002, k
