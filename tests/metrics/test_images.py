"""Image metrics on synthetic features: the Fréchet distance against closed forms, precision and recall
on sets whose manifolds are known, class accuracy, and ImageMetrics with a stand-in classifier."""

import logging

import pytest
import torch

import flowmaps.metrics
from flowmaps.metrics import (
    ImageMetrics,
    class_accuracy,
    frechet_distance,
    precision_recall,
)
from flowmaps.metrics import images as image_metrics


def _exact_moments(n: int, mean: torch.Tensor, root: torch.Tensor, seed: int) -> torch.Tensor:
    """``n`` points whose sample mean is ``mean`` and whose unbiased sample covariance is ``root @ root.T``."""
    z = torch.randn(n, mean.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(dim=0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample covariance exactly I
    return mean + z @ root.T


def _rotation(dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    a = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    b = torch.randn(400, 16, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.3
    assert abs(frechet_distance(a, a)) < 1e-9
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    # fewer points than features: singular covariances, zero against itself up to the rounding that the
    # square roots of the zero eigenvalues magnify (relative to the traces, 2 x 64 here)
    few = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    assert abs(frechet_distance(few, few)) < 1e-6 * 2 * float(torch.cov(few.double().T).trace())


def test_frechet_distance_of_commuting_covariances_has_a_closed_form():
    """``S_a = Q diag(l_a) Q^T``, ``S_b = Q diag(l_b) Q^T``: ``|mu_a - mu_b|^2 + sum (sqrt l_a - sqrt l_b)^2``."""
    dim, q = 6, _rotation(6, 0)
    l_a = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1, 4.0], dtype=torch.float64)
    l_b = torch.tensor([1.5, 1.0, 0.5, 3.5, 0.2, 1.0], dtype=torch.float64)
    mu_a, mu_b = torch.zeros(dim, dtype=torch.float64), torch.arange(dim, dtype=torch.float64) / 4
    a = _exact_moments(300, mu_a, q * l_a.sqrt(), seed=1)
    b = _exact_moments(200, mu_b, q * l_b.sqrt(), seed=2)
    expected = float((mu_a - mu_b).square().sum() + (l_a.sqrt() - l_b.sqrt()).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # diagonal covariances, as float32 input
    a, b = _exact_moments(300, mu_a, torch.diag(l_a.sqrt()), 3), _exact_moments(300, mu_a, torch.diag(l_b.sqrt()), 4)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(float((l_a.sqrt() - l_b.sqrt()).square().sum()),
                                                                   rel=1e-4)


def test_frechet_distance_of_non_commuting_2x2_covariances():
    """For 2 x 2 matrices ``Tr (S_a S_b)^{1/2} = (Tr S_a S_b + 2 (det S_a det S_b)^{1/2})^{1/2}``."""
    s_a = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    s_b = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    mean = torch.zeros(2, dtype=torch.float64)
    a = _exact_moments(100, mean, torch.linalg.cholesky(s_a), 5)
    b = _exact_moments(100, mean, torch.linalg.cholesky(s_b), 6)
    trace_root = (torch.trace(s_a @ s_b) + 2 * (torch.det(s_a) * torch.det(s_b)).sqrt()).sqrt()
    expected = float(torch.trace(s_a) + torch.trace(s_b) - 2 * trace_root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="same number of features"):
        frechet_distance(x, torch.randn(10, 5))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(x, torch.full((10, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\[N >= 2, F\]"):
        frechet_distance(torch.randn(10, 2, 2), x)


def _clusters(centres: torch.Tensor, per: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c + 0.1 * torch.randn(per, centres.shape[1], generator=g) for c in centres])


def test_precision_and_recall_of_identical_and_disjoint_sets():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_a_generator_covering_half_the_modes_is_precise_with_half_the_recall():
    centres = 10.0 * torch.eye(4)
    real = _clusters(centres, 500, 0)
    fake = _clusters(centres[:2], 1000, 1)
    precision, recall = precision_recall(real, fake)
    assert precision > 0.9
    assert 0.4 < recall <= 0.5


def test_precision_and_recall_in_chunks_match_the_full_distance_matrix(monkeypatch):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(70, 3, generator=g), 0.5 + torch.randn(50, 3, generator=g)
    k = 3
    d_rr, d_ff, d_fr = torch.cdist(real, real), torch.cdist(fake, fake), torch.cdist(fake, real)
    r_real, r_fake = d_rr.sort(dim=1).values[:, k], d_ff.sort(dim=1).values[:, k]
    expected = (float((d_fr <= r_real).any(dim=1).float().mean()), float((d_fr.T <= r_fake).any(dim=1).float().mean()))
    monkeypatch.setattr(image_metrics, "_CHUNK_VALUES", 200)  # chunks of 2 to 4 rows
    assert precision_recall(real, fake, k) == pytest.approx(expected)
    assert torch.allclose(image_metrics.knn_radii(real, k), r_real.double())


def test_precision_recall_needs_fewer_neighbours_than_points():
    with pytest.raises(ValueError, match="1 <= k < N"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)


def test_class_accuracy_from_logits_or_predictions():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 2])
    result = class_accuracy(predictions, labels)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["per_class"] == pytest.approx({0: 0.5, 1: 2 / 3, 2: 1.0})
    logits = torch.nn.functional.one_hot(predictions, 4).float()
    assert class_accuracy(logits, labels) == result
    with pytest.raises(ValueError, match="one label per row"):
        class_accuracy(predictions, labels[:-1])


class _Brightness:
    """A stand-in classifier of ``[B, 1, 2, 2]`` images: the flattened pixels as features, class 1 for a
    positive mean, else 0."""

    calls = 0

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        mean = x.flatten(1).mean(dim=1)
        return x.flatten(1), torch.stack([-mean, mean], dim=1)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = (2.0 * labels - 1)[:, None, None, None] * 0.5 + 0.2 * torch.randn(n, 1, 2, 2, generator=g)
    return x, labels


def test_image_metrics_floor_and_samples_against_the_same_reference():
    x_test, y_test = _images(2000, 0)
    classifier = _Brightness()
    scorer = ImageMetrics(classifier, x_test, y_test)
    assert scorer.size == 1000 and classifier.calls == 1
    floor = scorer.floor()
    assert set(floor) == {"fd", "precision", "recall", "class_accuracy", "class_accuracy_per_class"}
    assert floor["fd"] < 0.01 and floor["precision"] > 0.8 and floor["recall"] > 0.8
    assert floor["class_accuracy"] > 0.99 and set(floor["class_accuracy_per_class"]) == {0, 1}
    # the floor set itself, scored as samples, gets the floor's values
    again = scorer(x_test[1000:], y_test[1000:])
    assert again.pop("class_accuracy_per_class") == floor.pop("class_accuracy_per_class")
    assert again == pytest.approx(floor)
    # fresh samples of the same distribution score about the floor; extra samples are not used for the FD
    x_new, y_new = _images(3000, 1)
    assert scorer(x_new, y_new)["fd"] == pytest.approx(frechet_distance(x_new[:1000].flatten(1), x_test[:1000].flatten(1)))
    # a generator that only makes class 1, asked for both: half the recall, half the class accuracy
    bright = x_new[y_new == 1][:1000]
    one_class = scorer(bright, torch.randint(0, 2, (len(bright),), generator=torch.Generator().manual_seed(2)))
    assert one_class["fd"] > 100 * floor["fd"] and one_class["precision"] > 0.8 and one_class["recall"] < 0.6
    assert 0.4 < one_class["class_accuracy"] < 0.6 and one_class["class_accuracy_per_class"][1] == 1.0
    # without labels there is no class accuracy
    assert set(scorer(x_new)) == {"fd", "precision", "recall"}
    assert set(ImageMetrics(classifier, x_test).floor()) == {"fd", "precision", "recall"}


def test_image_metrics_warn_when_samples_are_fewer_than_the_reference(caplog):
    x_test, y_test = _images(400, 0)
    scorer = ImageMetrics(_Brightness(), x_test, y_test)
    with caplog.at_level(logging.WARNING, logger="flowmaps.metrics"):
        scorer(x_test[:50])
    assert "not comparable with the floor" in caplog.text
    with pytest.raises(ValueError, match="one class per sample"):
        scorer(x_test[:50], y_test[:49])
    with pytest.raises(ValueError, match="two sets of size rows"):
        ImageMetrics(_Brightness(), x_test, y_test, size=201)


def test_the_package_keeps_every_name_of_the_old_module():
    from flowmaps.metrics import samples

    for name in ("energy_distance", "mmd", "sliced_wasserstein", "histogram", "histogram_kl", "checkerboard_bin_probs",
                 "time_pair_grid", "FlowMapReference", "flow_map_reference", "FlowMapError", "flow_map_error",
                 "NFECounter", "MMD_BANDWIDTHS", "HIST_ESTIMATORS"):
        assert getattr(flowmaps.metrics, name) is getattr(samples, name)
    assert set(flowmaps.metrics.__all__) <= set(dir(flowmaps.metrics))
