import math

import pytest
import torch

from flowmaps.weighting import (
    LossTerms, LossWeighting, adaptive_weight, penalty, row_norm, squared_norm, time_weight,
)


def test_squared_norm_reductions():
    r = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    assert torch.equal(squared_norm(r, "sum"), torch.tensor([5.0, 9.0]))
    assert torch.equal(squared_norm(r, "mean"), torch.tensor([2.5, 4.5]))
    assert torch.equal(squared_norm(r.reshape(2, 1, 2), "sum"), torch.tensor([5.0, 9.0]))


def test_penalties_are_quadratic_near_zero_and_robust_far_away():
    small, large = torch.tensor([1e-8]), torch.tensor([1e4])
    c = 0.1
    assert penalty(small, "mse").item() == pytest.approx(1e-8)
    assert penalty(small, "cauchy", c).item() == pytest.approx(1e-8, rel=1e-5)
    assert penalty(small, "pseudo_huber", c).item() == pytest.approx(1e-8 / (2 * c), rel=1e-5)
    assert penalty(large, "pseudo_huber", c).item() == pytest.approx(100.0 - c, rel=1e-6)  # ~ |R|
    assert penalty(large, "cauchy", c).item() == pytest.approx(c**2 * math.log1p(1e4 / c**2))


def test_adaptive_weight_is_stop_gradient_and_makes_the_loss_scale_free():
    sq = torch.tensor([4.0, 400.0], requires_grad=True)
    w = adaptive_weight(sq, p=1.0, c=1e-3)
    assert not w.requires_grad
    assert torch.allclose(w * sq.detach(), torch.ones(2), atol=1e-3)
    (w * sq).sum().backward()
    assert torch.allclose(sq.grad, w)


def test_time_weights():
    s, t = torch.tensor([0.9, 0.2]), torch.tensor([0.1, 0.7])
    assert torch.equal(time_weight("none", s, t), torch.ones(2))
    assert torch.allclose(time_weight("gap", s, t), torch.tensor([0.8, 0.5]))


def test_loss_weighting_composes_penalty_adaptive_and_time_weights():
    r = torch.tensor([[3.0, 4.0]])  # |R|^2 = 25 (sum)
    s, t = torch.tensor([1.0]), torch.tensor([0.5])
    weighting = LossWeighting("pseudo_huber", 1.0, adaptive_p=0.5, adaptive_c=0.0 + 1e-9, reduction="sum",
                              time_weight="gap")
    expected = (math.sqrt(26.0) - 1.0) / math.sqrt(25.0) * 0.5
    assert weighting(r, s, t).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="needs the times"):
        weighting(r)


@pytest.mark.parametrize("kw,msg", [({"penalty": "l1"}, "unknown penalty"), ({"reduction": "max"}, "unknown reduction"),
                                    ({"time_weight": "snr"}, "unknown time_weight"), ({"penalty_c": 0.0}, "penalty_c"),
                                    ({"adaptive_p": -1.0}, "adaptive_p"), ({"adaptive_c": 0.0}, "adaptive_c")])
def test_bad_weighting_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LossWeighting(**kw)


def test_loss_terms_weight_each_row_once_and_log_per_term_means():
    terms = LossTerms(batch=4)
    terms.add("diagonal", torch.tensor([1.0, 3.0]))
    terms.add("rule", torch.tensor([5.0, 7.0]))
    terms.add("empty", torch.zeros(0))
    terms.log("tangent_norm", row_norm(torch.tensor([[3.0, 4.0], [0.0, 0.0]])))
    loss, logged, diagnostics = terms.result()
    assert loss.item() == pytest.approx(4.0)
    assert logged["diagonal"].item() == 2.0 and logged["rule"].item() == 6.0 and "empty" not in logged
    assert diagnostics["tangent_norm"].item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="no loss term"):
        LossTerms(batch=2).result()
