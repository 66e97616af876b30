"""Metrics: near zero on two samples of one distribution, clearly positive on different ones."""

import math

import pytest
import torch

from flowmaps import metrics
from flowmaps.data.toy2d import checkerboard
from flowmaps.flow_map import FlowMap
from flowmaps.oracle import ExactAverageVelocity
from flowmaps.samplers import sample_flow_map, sample_ode
from tests.conftest import small_mixture


def _two_samples(n=3000, seed=0):
    mix = small_mixture()
    g = torch.Generator().manual_seed(seed)
    return mix.sample(n, g), mix.sample(n, g), g


# (metric, largest allowed ratio of the same-distribution value to a different-distribution value):
# sliced W2 is a distance, not a squared one, so its sampling noise is relatively larger.
SAMPLE_METRICS = [(metrics.energy_distance, 0.2), (metrics.mmd, 0.2), (metrics.sliced_wasserstein, 0.5)]


@pytest.mark.parametrize("metric,ratio", SAMPLE_METRICS, ids=lambda f: getattr(f, "__name__", str(f)))
def test_sample_metrics_separate_same_from_different(metric, ratio):
    x, y, g = _two_samples()
    shifted = y + torch.tensor([0.3, 0.0])
    blurred = y + 0.4 * torch.randn(y.shape, generator=g)
    same = metric(x, y)
    assert abs(same) < ratio * metric(x, shifted)
    assert abs(same) < ratio * metric(x, blurred)


def test_energy_distance_is_zero_on_identical_sets_and_symmetric():
    x, y, _ = _two_samples(500)
    assert metrics.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert metrics.energy_distance(x, y) == pytest.approx(metrics.energy_distance(y, x), rel=1e-9)


def test_energy_distance_matches_closed_form_for_point_masses():
    # two Dirac masses at distance d: 2 d - 0 - 0
    x = torch.zeros(10, 2)
    y = torch.tensor([[3.0, 4.0]]).repeat(10, 1)
    assert metrics.energy_distance(x, y) == pytest.approx(10.0)


def test_sliced_wasserstein_of_a_shift_is_the_projected_shift():
    """W2 of theta . (X + a) vs theta . X is |theta . a|; the RMS over uniform directions in 2D is |a| / sqrt(2)."""
    x, _, _ = _two_samples(2000)
    a = torch.tensor([0.6, 0.8])
    value = metrics.sliced_wasserstein(x + a, x, num_projections=4096)
    assert value == pytest.approx(1.0 / 2**0.5, rel=0.03)


def test_mmd_is_the_unbiased_statistic():
    """Same distribution: values scatter around 0 (the U-statistic can go negative), far below a shift's."""
    values = [metrics.mmd(*_two_samples(800, seed)[:2]) for seed in range(4)]
    x, y, _ = _two_samples(800)
    assert min(values) < 0 and max(abs(v) for v in values) < 0.05 * metrics.mmd(x, y + 0.3)


def test_metrics_reject_bad_input():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="same number of features"):
        metrics.energy_distance(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.mmd(x, torch.full((10, 2), float("nan")))
    with pytest.raises(ValueError, match="equal sample sizes"):
        metrics.sliced_wasserstein(x, torch.randn(11, 2))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.energy_distance(torch.randn(1, 2), x)
    with pytest.raises(ValueError, match="positive bandwidths"):
        metrics.mmd(x, x, bandwidths=(0.0,))


def test_checkerboard_bin_probabilities():
    p = metrics.checkerboard_bin_probs(50)
    assert p.shape == (50, 50) and p.sum().item() == pytest.approx(1.0)
    # bin [0, 0.04]^2 lies in the filled cell u, v in [0.5, 0.75) ... (i, j) = (2, 2): full probability 0.04^2 / 2
    assert p[25, 25].item() == pytest.approx(0.5 * 0.04**2)
    # bin [-0.04, 0]x[0, 0.04] lies in cell (1, 2), which is empty
    assert p[24, 25].item() == 0.0


def test_histogram_kl_floor_and_sensitivity():
    """Exact samples score near the estimator's floor; blurred or shifted samples score far above it."""
    g = torch.Generator().manual_seed(0)
    target = metrics.checkerboard_bin_probs(50)
    exact = checkerboard(65536, g)
    floor = metrics.histogram_kl(target, exact)
    # floor ~ log(1 + B / (2 N)) = 0.0189 for B = 2500 bins and N = 65536 (module docstring)
    assert abs(floor - 0.0189) < 0.003
    blurred = exact + 0.03 * torch.randn(exact.shape, generator=g)
    shifted = exact + torch.tensor([0.5, 0.0])
    assert metrics.histogram_kl(target, blurred) > floor + 0.05
    assert metrics.histogram_kl(target, shifted) > 1.0


def test_histogram_kl_rejects_bad_targets():
    with pytest.raises(ValueError, match="square"):
        metrics.histogram_kl(torch.ones(5, 4) / 20, torch.zeros(10, 2))
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.histogram_kl(torch.ones(5, 5), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="2D samples"):
        metrics.histogram_kl(torch.ones(5, 5) / 25, torch.zeros(10, 3))


def test_time_pair_grid():
    pairs = metrics.time_pair_grid(3)
    assert pairs == [(1.0, 0.5), (1.0, 0.0), (0.5, 0.0)]
    assert len(metrics.time_pair_grid(5)) == 10 and all(s > t for s, t in metrics.time_pair_grid(5))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.time_pair_grid(1)


class _Identity(torch.nn.Module):
    def forward(self, x, s, t, cond=None):
        return x


def test_flow_map_error_is_zero_at_the_exact_map_and_one_at_the_identity():
    mix = small_mixture()
    ref = metrics.flow_map_reference(mix, metrics.time_pair_grid(3), n=256, generator=torch.Generator().manual_seed(0))
    exact = FlowMap(ExactAverageVelocity(mix)).double()
    err = metrics.flow_map_error(exact, ref)
    assert err.mean < 1e-12 and set(err.per_pair) == {(1.0, 0.5), (1.0, 0.0), (0.5, 0.0)}
    assert metrics.flow_map_error(_Identity(), ref).mean == pytest.approx(1.0)


def test_flow_map_error_rejects_a_time_reversed_or_wrong_map():
    mix = small_mixture()
    ref = metrics.flow_map_reference(mix, [(1.0, 0.0), (0.75, 0.25)], n=256)
    exact = ExactAverageVelocity(mix)

    class Reversed(torch.nn.Module):  # the other convention: t = 0 noise, t = 1 data
        def forward(self, x, s, t, cond=None):
            return -exact(x, 1 - s, 1 - t)

    assert metrics.flow_map_error(FlowMap(Reversed()), ref).mean > 0.1
    # the ODE solved to the wrong end time
    short = FlowMap(ExactAverageVelocity(mix))

    class Short(torch.nn.Module):
        def forward(self, x, s, t, cond=None):
            return short(x, s, 0.5 * (s + t))

    assert metrics.flow_map_error(Short(), ref).mean > 0.1


def test_flow_map_reference_rejects_bad_pairs():
    with pytest.raises(ValueError, match="s != t"):
        metrics.flow_map_reference(small_mixture(), [(0.5, 0.5)])
    with pytest.raises(ValueError, match="s != t"):
        metrics.flow_map_reference(small_mixture(), [(1.5, 0.0)])


def test_nfe_counter_counts_network_calls():
    mix = small_mixture()
    counter = metrics.NFECounter(FlowMap(ExactAverageVelocity(mix)))
    noise = torch.randn(7, 2, dtype=torch.float64)
    with torch.no_grad():
        sample_flow_map(counter, noise, 4)
        assert (counter.calls, counter.examples) == (4, 28)
        counter.reset()
        sample_ode(counter, noise, 5, "heun")
        assert counter.calls == 10
        counter.reset()
        sample_ode(counter, noise, 5, "euler")
        assert counter.calls == 5


def test_the_two_checkerboard_estimators_and_their_floors():
    """``exact`` integrates the density over each bin; ``midpoint`` takes it at the bin's centre. Both
    are distributions over the 50 x 50 grid; exact samples sit at the exact estimator's floor
    (``log(1 + B / 2N)``) and far higher under the midpoint one, whose straddling bins are biased."""
    from flowmaps.data import get_data

    exact, mid = metrics.checkerboard_bin_probs(50), metrics.checkerboard_bin_probs(50, estimator="midpoint")
    assert abs(float(exact.sum()) - 1) < 1e-12 and abs(float(mid.sum()) - 1) < 1e-12
    assert set(torch.unique(mid).tolist()) == {0.0, 1 / 1252}  # 1252 centres in filled squares
    assert float((exact - mid).abs().max()) > 0 and bool(((exact == 0) <= (mid == 0)).all())
    samples = get_data("checkerboard").sample(65536, torch.Generator().manual_seed(0)).x0
    floor_exact = metrics.histogram_kl(exact, samples)
    floor_mid = metrics.histogram_kl(mid, samples)
    assert abs(floor_exact - math.log(1 + 2500 / (2 * 65536))) < 0.004
    assert 0.065 < floor_mid < 0.08 and floor_mid > 3 * floor_exact
    with pytest.raises(ValueError, match="unknown histogram estimator"):
        metrics.checkerboard_bin_probs(50, estimator="centre")
