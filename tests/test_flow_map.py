import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.nets import MLP


def _model(dim=3):
    torch.manual_seed(0)
    return FlowMap(MLP(dim, width=32, depth=2))


def test_boundary_condition_holds_by_construction():
    model = _model()
    x = torch.randn(8, 3)
    t = torch.rand(8)
    assert torch.equal(model(x, t, t), x)


def test_forward_is_x_plus_gap_times_average_velocity():
    model = _model()
    x, s, t = torch.randn(8, 3), torch.rand(8), torch.rand(8)
    V = model.average_velocity(x, s, t)
    assert torch.allclose(model(x, s, t), x + (t - s)[:, None] * V)
    assert torch.allclose(model.velocity(x, t), model.average_velocity(x, t, t))


def test_float_and_tensor_times_agree():
    model = _model()
    x = torch.randn(4, 3)
    assert torch.allclose(model(x, 0.7, 0.2), model(x, torch.full((4,), 0.7), torch.tensor(0.2)))


def test_any_batch_shape():
    model = FlowMap(MLP(12, width=16, depth=1))
    x = torch.randn(5, 3, 4)
    assert model(x, 1.0, 0.0).shape == x.shape


@pytest.mark.parametrize("s,t,msg", [(1.5, 0.0, "s must lie in"), (1.0, -0.1, "t must lie in"),
                                      (float("nan"), 0.0, "s must lie in")])
def test_times_outside_unit_interval_are_rejected(s, t, msg):
    with pytest.raises(ValueError, match=msg):
        _model()(torch.randn(2, 3), s, t)


def test_time_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"t must be a float or a tensor of shape \[B\] = \[4\]"):
        _model()(torch.randn(4, 3), 1.0, torch.rand(3))


def test_feature_mismatch_is_rejected():
    with pytest.raises(ValueError, match="MLP was built for 3 features"):
        _model()(torch.randn(4, 5), 1.0, 0.0)


def test_class_conditional_mlp_takes_labels_and_the_null_class():
    model = FlowMap(MLP(2, width=16, depth=1, num_classes=3))
    x = torch.randn(4, 2)
    out = model(x, 1.0, 0.0, cond=torch.tensor([0, 1, 2, -1]))
    assert out.shape == (4, 2)
    assert torch.equal(model(x, 1.0, 0.0)[3], out[3])  # cond=None is the null class (-1) of every row
    with pytest.raises(ValueError, match="class label 3 is out of range"):
        model(x, 1.0, 0.0, cond=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="unconditional"):
        FlowMap(MLP(2, width=16, depth=1))(x, 1.0, 0.0, cond=torch.tensor([0, 1, 2, 0]))


def test_forward_with_tangents_applies_the_product_rule():
    """``FlowMap(x, s, t, tangents=(dx, ds, dt))`` returns ``F`` and ``dF = dx + (dt - ds) V + (t - s) dV``;
    float time tangents broadcast, a misshaped ``dx`` is refused."""
    import pytest
    from flowmaps.nets import MLP

    torch.manual_seed(0)
    model = FlowMap(MLP(2, width=16, depth=2)).double()
    x, dx = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    s, t = torch.full((5,), 0.9, dtype=torch.float64), torch.full((5,), 0.2, dtype=torch.float64)
    v, dv = model(x, s, t, output="V", tangents=(dx, 0.5, -1.0))
    f, df = model(x, s, t, tangents=(dx, 0.5, -1.0))
    assert torch.allclose(f, x + (t - s)[:, None] * v)
    assert torch.allclose(df, dx + (-1.0 - 0.5) * v + (t - s)[:, None] * dv)
    with pytest.raises(ValueError, match="tangent dx has shape"):
        model(x, s, t, tangents=(dx[:, :1], 0.0, 1.0))
