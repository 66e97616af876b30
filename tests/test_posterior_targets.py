"""The batch-posterior (stable target field) diagonal target against the exact oracle."""

import pytest
import torch

from flowmaps.methods import build_method
from flowmaps.posterior_targets import empirical_velocity
from tests.conftest import small_mixture
from tests.methods.exact_checks import loss_and_grad
from tests.methods.exact_models import exact_model


def _draw(mixture, n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = mixture.sample(n, g).double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, eps, torch.full((n,), t, dtype=torch.float64)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 1.0])
def test_many_references_give_the_exact_marginal_velocity(schedule, t):
    """With 20k exact samples as references (plus the row's own x0) the target is the oracle's
    velocity to a small fraction of the conditional target's error."""
    mixture = small_mixture(schedule)
    x0, eps, tt = _draw(mixture, 1000, t)
    references = torch.cat([x0, mixture.sample(20_000, torch.Generator().manual_seed(1)).double()])
    exact = mixture.velocity(schedule.sample_xt(x0, eps, tt), tt)
    error = (empirical_velocity(schedule, x0, eps, tt, references) - exact).pow(2).sum(1).mean()
    conditional = (schedule.conditional_velocity(x0, eps, tt) - exact).pow(2).sum(1).mean()
    assert error < 0.01 * conditional, (float(error), float(conditional))


def test_own_sample_alone_or_low_noise_gives_the_conditional_target(schedule):
    mixture = small_mixture(schedule)
    x0, eps, tt = _draw(mixture, 500, 0.5)
    conditional = schedule.conditional_velocity(x0, eps, tt)
    own = torch.stack([empirical_velocity(schedule, x0[i:i + 1], eps[i:i + 1], tt[i:i + 1], x0[i:i + 1])[0]
                       for i in range(20)])
    assert torch.allclose(own, conditional[:20], atol=1e-12)
    for t in (0.0, 1e-7, 1e-4):  # the weights collapse onto the own x0: no division by a small sigma
        x0, eps, tt = _draw(mixture, 500, t)
        target = empirical_velocity(schedule, x0, eps, tt, x0)
        assert torch.allclose(target, schedule.conditional_velocity(x0, eps, tt), atol=1e-9), t


def test_classes_average_only_over_their_own_references(schedule):
    mixture = small_mixture(schedule)
    x0, eps, tt = _draw(mixture, 400, 0.6)
    labels = torch.arange(400) % 3
    with_labels = empirical_velocity(schedule, x0, eps, tt, x0, labels, labels)
    for c in range(3):
        rows = labels == c
        alone = empirical_velocity(schedule, x0[rows], eps[rows], tt[rows], x0[rows])
        assert torch.allclose(with_labels[rows], alone, atol=1e-12)


def test_null_class_rows_average_over_every_reference(schedule):
    """Label dropout's null class -1 is the unconditional model: its rows weigh the whole batch, whatever
    the references' labels (dropped ones included), while labelled rows keep to their class."""
    mixture = small_mixture(schedule)
    x0, eps, tt = _draw(mixture, 300, 0.7)
    labels = torch.arange(300) % 3
    labels[::7] = -1  # dropped rows, which are also dropped references
    with_labels = empirical_velocity(schedule, x0, eps, tt, x0, labels, labels)
    null = labels < 0
    unconditional = empirical_velocity(schedule, x0, eps, tt, x0)
    assert torch.allclose(with_labels[null], unconditional[null], atol=1e-12)
    for c in range(3):
        rows = labels == c
        alone = empirical_velocity(schedule, x0[rows], eps[rows], tt[rows], x0[rows])
        assert torch.allclose(with_labels[rows], alone, atol=1e-12)


def test_float32_inputs_stay_float32_and_finite():
    mixture = small_mixture()
    x0, eps, tt = (v.float() for v in _draw(mixture, 256, 0.0))
    tt = torch.rand(256) ** 4  # many low-noise rows
    target = empirical_velocity(mixture.schedule, x0, eps, tt, x0)
    assert target.dtype == torch.float32 and torch.isfinite(target).all()


@pytest.mark.parametrize("name", ["fm", "lsd", "esd"])
def test_diagonal_term_is_near_zero_and_stationary_at_the_exact_map(gaussian, name):
    """At the exact map the conditional diagonal loss is the conditional target's variance; the
    batch-posterior target removes most of it, and the gradient stays at zero up to its noise."""
    options = {} if name == "fm" else {"diagonal_fraction": 1.0}
    results = {}
    for target in ("conditional", "batch_posterior"):
        method = build_method(name, gaussian.schedule, diagonal_target=target, **options)
        out, grad = loss_and_grad(method, exact_model(gaussian), gaussian, n=4096)
        results[target] = (float(out.terms["diagonal"]), grad)
    (cond_loss, _), (post_loss, post_grad) = results["conditional"], results["batch_posterior"]
    assert post_loss < 0.1 * cond_loss, results
    _, wrong = loss_and_grad(build_method(name, gaussian.schedule, diagonal_target="batch_posterior", **options),
                             exact_model(gaussian, "time_reversed"), gaussian, n=4096)
    assert abs(post_grad) < 0.05 * abs(wrong), (post_grad, wrong)


def test_bad_options_are_named(gaussian):
    with pytest.raises(ValueError, match="diagonal_target of method 'lsd' must be one of .*got 'posterior'"):
        build_method("lsd", gaussian.schedule, diagonal_target="posterior")
    with pytest.raises(ValueError, match="diagonal_target of method 'fm' must be one of"):
        build_method("fm", gaussian.schedule, diagonal_target="stf")
    with pytest.raises(ValueError, match="diagonal_target 'teacher' of method 'lsd' needs a teacher"):
        build_method("lsd", gaussian.schedule, diagonal_target="teacher")
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="do not match"):
        empirical_velocity(gaussian.schedule, x0, x0, torch.ones(4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="for both the rows and the references"):
        empirical_velocity(gaussian.schedule, x0, x0, torch.ones(4), x0, cond=torch.zeros(4))
