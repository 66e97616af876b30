"""Every registered backbone (``model.backbone``), driven by the registry: shapes, and forward-mode
tangents and their parameter gradients against finite differences, through each JVP backend."""

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.jvp import flow_jvp
from flowmaps.nets import backbone_names, build_backbone
from flowmaps.train.config import ModelConfig

BACKENDS = ["func", "forward_ad", "auto"]


def small(name: str, dim: int = 3) -> FlowMap:
    torch.manual_seed(0)
    return FlowMap(build_backbone(ModelConfig(backbone=name, width=16, depth=2), dim)).double()


@pytest.mark.parametrize("name", backbone_names())
def test_the_backbone_predicts_a_velocity_shaped_like_the_data(name):
    model = small(name)
    x, s, t = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    assert model(x, s, t, output="V").shape == (5, 3)
    assert torch.allclose(model(x, t, t), x)  # F(x, t, t) = x by construction


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", backbone_names())
def test_tangents_and_their_gradients_match_finite_differences(name, backend):
    model = small(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    s, t = torch.rand(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    dx = torch.randn(4, 3, generator=g, dtype=torch.float64)
    h = 1e-6
    _, tangent = flow_jvp(model, x, s, t, dx=dx, ds=1.0, dt=0.5, output="V", backend=backend, grad="full")
    with torch.no_grad():
        fd = (model(x + h * dx, s + h, t + 0.5 * h, output="V", check_times=False)
              - model(x - h * dx, s - h, t - 0.5 * h, output="V", check_times=False)) / (2 * h)
    assert torch.allclose(tangent, fd, atol=1e-6, rtol=1e-5)
    weights = torch.randn(tangent.shape, generator=g, dtype=torch.float64)
    (tangent * weights).sum().backward()
    param = next(p for p in model.parameters() if p.grad is not None and p.dim() > 1)
    direction = torch.randn(param.shape, generator=g, dtype=torch.float64)
    analytic = float((param.grad * direction).sum())

    def tangent_sum(delta: float) -> float:
        with torch.no_grad():
            param.add_(delta * direction)
            value = flow_jvp(model, x, s, t, dx=dx, ds=1.0, dt=0.5, output="V", backend="func", grad="none")[1]
            param.sub_(delta * direction)
        return float((value * weights).sum())

    numeric = (tangent_sum(1e-5) - tangent_sum(-1e-5)) / 2e-5
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-7)
