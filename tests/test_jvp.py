import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.jvp import JVP_BACKENDS, jvp
from flowmaps.nets import MLP


def test_backends_agree_with_closed_form_gaussian_derivative(gaussian):
    """d/dt F for the Gaussian map equals v(F, t); every backend recovers it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    s, t = torch.full((16,), 0.8, dtype=torch.float64), torch.full((16,), 0.3, dtype=torch.float64)
    for backend in JVP_BACKENDS:
        jump, d_dt = jvp(lambda t_: gaussian.flow_map(x, s, t_), (t,), (torch.ones_like(t),), backend=backend)
        assert torch.allclose(d_dt, gaussian.velocity(jump, t), atol=1e-6), backend


def test_backends_agree_on_a_network_and_its_parameter_gradients():
    torch.manual_seed(0)
    model = FlowMap(MLP(2, width=32, depth=2)).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    s, t = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    v = torch.randn(8, 2, dtype=torch.float64)
    results = {}
    for backend in JVP_BACKENDS:
        model.zero_grad()
        _, tangent = jvp(lambda x_, s_: model(x_, s_, t, check_times=False), (x, s), (v, torch.ones_like(s)),
                         backend=backend)
        tangent.pow(2).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[backend] = (tangent.detach(), grads)
    ref_tangent, ref_grads = results["func"]
    for backend, (tangent, grads) in results.items():
        assert torch.allclose(tangent, ref_tangent, atol=1e-7), backend
        assert torch.allclose(grads, ref_grads, atol=1e-6, rtol=1e-5), backend


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown JVP backend"):
        jvp(torch.sin, (torch.zeros(2),), (torch.ones(2),), backend="nope")
    with pytest.raises(ValueError, match="tangent 0 has shape"):
        jvp(torch.sin, (torch.zeros(2),), (torch.ones(3),))
