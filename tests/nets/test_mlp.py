"""Gradients through a JVP tangent must match finite differences in the parameters."""

import pytest
import torch
from torch.func import jvp

from flowmaps.flow_map import FlowMap
from flowmaps.nets import MLP


def _tangent_loss(f, x, v):
    return jvp(f, (x,), (v,))[1].pow(2).sum()


def _fd_grad(param, loss_fn, index=0, h=1e-6):
    with torch.no_grad():
        old = param.view(-1)[index].item()
        param.view(-1)[index] = old + h
        plus = loss_fn().item()
        param.view(-1)[index] = old - h
        minus = loss_fn().item()
        param.view(-1)[index] = old
    return (plus - minus) / (2 * h)


def test_gradient_through_tangent_matches_finite_differences():
    torch.manual_seed(0)
    model = FlowMap(MLP(2, width=16, depth=2, num_freqs=3)).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    s, t = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    v = torch.randn(6, 2, dtype=torch.float64)

    def loss():
        return _tangent_loss(lambda x_: model(x_, s, t, check_times=False), x, v)

    model.zero_grad()
    loss().backward()
    for name, p in model.named_parameters():
        assert abs(p.grad.view(-1)[0].item() - _fd_grad(p, loss)) < 1e-5 * max(1.0, abs(p.grad.view(-1)[0].item())), name


def test_silu_with_tangent_gradients_and_first_order_only():
    """The fused SiLU-with-tangent node has the exact first derivatives (``gradcheck``) and refuses to
    be differentiated twice rather than return wrong second derivatives."""
    from flowmaps.nets.mlp import SiLUWithTangent

    z = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    dz = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiLUWithTangent.apply, (z, dz))
    out, tangent = SiLUWithTangent.apply(z, dz)
    assert torch.allclose(out, torch.nn.functional.silu(z))
    (g,) = torch.autograd.grad((tangent**2).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
