import pytest
import torch
from torch import nn

from flowmaps.flow_map import FlowMap
from flowmaps.jvp import FN_BACKENDS, GRAD_MODES, JVP_BACKENDS, flow_jvp, jvp, resolve_backend
from flowmaps.nets import MLP


def test_backends_agree_with_closed_form_gaussian_derivative(gaussian):
    """d/dt F for the Gaussian map equals v(F, t); every backend recovers it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    s, t = torch.full((16,), 0.8, dtype=torch.float64), torch.full((16,), 0.3, dtype=torch.float64)
    for backend in FN_BACKENDS:
        jump, d_dt = jvp(lambda t_: gaussian.flow_map(x, s, t_), (t,), (torch.ones_like(t),), backend=backend)
        assert torch.allclose(d_dt, gaussian.velocity(jump, t), atol=1e-6), backend


def closed_form_tangent(gaussian, x, s, t, dx, ds, dt):
    """The directional derivative of ``F(x, s, t) = a_t mu + sqrt(q_t / q_s) (x - a_s mu)`` along
    ``(dx, ds, dt)``, ``q = a^2 c^2 + sigma^2``, ``q' = 2 (a a' c^2 + sigma sigma')``."""
    sch, mu, c = gaussian.schedule, gaussian.means[0], gaussian.stds[0]

    def coeffs(time):
        a, sg, da, dsg = (f(time)[:, None] for f in (sch.alpha, sch.sigma, sch.d_alpha, sch.d_sigma))
        return a, da, a**2 * c**2 + sg**2, 2 * (a * da * c**2 + sg * dsg)

    a_s, da_s, q_s, dq_s = coeffs(s)
    a_t, da_t, q_t, dq_t = coeffs(t)
    ratio = torch.sqrt(q_t / q_s)
    centred = x - a_s * mu
    d_dx = ratio * dx
    d_dt = da_t * mu + dq_t / (2 * q_t) * ratio * centred
    d_ds = -dq_s / (2 * q_s) * ratio * centred - ratio * da_s * mu
    return d_dx + d_ds * ds[:, None] + d_dt * dt[:, None]


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("backend", [b for b in JVP_BACKENDS if b != "fused"])
def test_flow_jvp_matches_the_closed_form_gaussian_flow_map(exact_gaussian_map, gaussian, backend, grad):
    g = torch.Generator().manual_seed(1)
    n = 32
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    s = 0.1 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    t = 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    dx = torch.randn(n, 3, generator=g, dtype=torch.float64)
    ds, dt = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    jump, tangent = flow_jvp(exact_gaussian_map, x, s, t, dx=dx, ds=ds, dt=dt, output="F", backend=backend, grad=grad)
    expected = closed_form_tangent(gaussian, x, s, t, dx, ds, dt)
    tol = 1e-6 if backend == "finite_difference" else 1e-10
    assert torch.allclose(tangent, expected, atol=tol, rtol=tol), (tangent - expected).abs().max()
    assert torch.allclose(jump, gaussian.flow_map(x, s, t), atol=1e-12)


def test_lagrangian_and_eulerian_rules_hold_for_the_exact_map(exact_gaussian_map, gaussian):
    """``d/dt F = v(F, t)`` and ``d/ds F + grad_x F . v(x, s) = 0``; the opposite tangents fail."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    s = 0.2 + 0.8 * torch.rand(64, generator=g, dtype=torch.float64)
    t = s * torch.rand(64, generator=g, dtype=torch.float64)
    jump, d_dt = flow_jvp(exact_gaussian_map, x, s, t, dt=1.0, grad="none")
    assert torch.allclose(d_dt, gaussian.velocity(jump, t), atol=1e-10)
    v = gaussian.velocity(x, s)
    _, eulerian = flow_jvp(exact_gaussian_map, x, s, t, dx=v, ds=1.0, grad="none")
    assert eulerian.abs().max() < 1e-10
    _, wrong = flow_jvp(exact_gaussian_map, x, s, t, dx=-v, ds=1.0, grad="none")
    assert wrong.abs().max() > 1e-2


def _network(dropout: float = 0.0) -> FlowMap:
    torch.manual_seed(0)
    net = MLP(2, width=32, depth=2)
    if dropout > 0:
        net.layers = nn.Sequential(*net.layers[:2], nn.Dropout(dropout), *net.layers[2:])
    return FlowMap(net).double()


def _inputs(n: int = 8, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    s, t = torch.rand(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)
    return x, s, t, torch.randn(n, 2, generator=g, dtype=dtype)


def test_backends_agree_on_a_network_and_its_parameter_gradients():
    model = _network()
    x, s, t, v = _inputs()
    results = {}
    for backend in FN_BACKENDS:
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


@pytest.mark.parametrize("backend", JVP_BACKENDS)
def test_gradient_modes(backend):
    """``primal``: the tangent is detached and the primal's gradient is that of a plain forward;
    ``none``: nothing carries a gradient; ``full``: both do."""
    model = _network()
    x, s, t, v = _inputs()
    primal, tangent = flow_jvp(model, x, s, t, dx=v, ds=1.0, output="V", backend=backend, grad="primal")
    assert primal.requires_grad and not tangent.requires_grad
    primal.pow(2).sum().backward()
    via_jvp = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x, s, t, output="V", check_times=False).pow(2).sum().backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(via_jvp, model.parameters()))
    primal, tangent = flow_jvp(model, x, s, t, dx=v, ds=1.0, output="V", backend=backend, grad="none")
    assert not primal.requires_grad and not tangent.requires_grad
    primal, tangent = flow_jvp(model, x, s, t, dx=v, ds=1.0, output="V", backend=backend, grad="full")
    assert primal.requires_grad and tangent.requires_grad


@pytest.mark.parametrize("backend", ["func", "double_backward"])
def test_dropout_masks_are_identical_in_the_tangent_pass_and_the_gradient_forward(backend):
    """The gradient forward replays the random-number state of the tangent pass: one dropout mask."""
    model = _network(dropout=0.5).train()
    x, s, t, v = _inputs(64)
    torch.manual_seed(7)
    primal, tangent = flow_jvp(model, x, s, t, dx=v, ds=1.0, output="V", backend=backend, grad="primal")
    torch.manual_seed(7)
    primal_jvp_pass, tangent_ref = flow_jvp(model, x, s, t, dx=v, ds=1.0, output="V", backend=backend, grad="none")
    assert torch.equal(primal.detach(), primal_jvp_pass) and torch.equal(tangent, tangent_ref)
    # without the replay a second forward draws a new mask: the check above can fail
    assert not torch.equal(model(x, s, t, output="V", check_times=False).detach(), primal_jvp_pass)


def test_finite_differences_see_one_dropout_mask():
    """The plus, minus and centre evaluations of a central difference share the dropout mask, the
    one forward mode draws from the same generator state."""
    model = _network(dropout=0.5).train()
    x, s, t, v = _inputs(64)
    torch.manual_seed(11)
    _, exact = flow_jvp(model, x, s, t, dx=v, ds=1.0, output="V", backend="func", grad="none")
    torch.manual_seed(11)
    _, fd = flow_jvp(model, x, s, t, dx=v, ds=1.0, output="V", backend="finite_difference", grad="none")
    assert torch.allclose(fd, exact, atol=1e-6)


def test_higher_precision_tangent():
    """A float32 network's tangent in float64: float64 finite differences agree with forward mode,
    float32 finite differences do not, and a float64 forward-mode tangent matches the float64 network."""
    model32 = _network().float()
    model64 = _network()
    x, s, t, v = _inputs(16, torch.float32)
    _, exact = flow_jvp(model64, x.double(), s.double(), t.double(), dx=v.double(), ds=1.0, grad="none")
    _, fwd32 = flow_jvp(model32, x, s, t, dx=v, ds=1.0, grad="none")
    _, fwd64 = flow_jvp(model32, x, s, t, dx=v, ds=1.0, grad="none", tangent_dtype=torch.float64)
    _, fd64 = flow_jvp(model32, x, s, t, dx=v, ds=1.0, backend="finite_difference", grad="none")
    _, fd32 = flow_jvp(model32, x, s, t, dx=v, ds=1.0, backend="finite_difference", grad="none",
                       tangent_dtype=torch.float32, fd_step=1e-6)
    assert fwd64.dtype == torch.float32
    err = {k: (val.double() - exact).abs().max().item() for k, val in
           dict(fwd32=fwd32, fwd64=fwd64, fd64=fd64, fd32=fd32).items()}
    assert err["fwd64"] < 1e-6 and err["fd64"] < 1e-5, err
    assert err["fd32"] > 10 * err["fd64"], err


def test_ddp_gives_the_same_gradients_and_synchronises_every_parameter(tmp_path):
    """Under DistributedDataParallel (gloo, one process) every backend and gradient mode gives the
    gradients of the unwrapped model, and every parameter's gradient passes the all-reduce hook. The
    loop runs many iterations on one wrapper, so DDP's bucket rebuild (second gradient forward) falls
    inside a tangent pass too."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.ddp_hooks import count_reduced_gradients

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _network()
        ddp = DDP(_network())
        reduced = count_reduced_gradients(ddp)
        x, s, t, v = _inputs()
        n_params = len(list(model.parameters()))
        for backend in JVP_BACKENDS:
            for grad in ("primal", "full"):
                grads = []
                for m in (model, ddp):
                    m.zero_grad()
                    reduced.clear()
                    primal, tangent = flow_jvp(m, x, s, t, dx=v, ds=1.0, output="V", backend=backend, grad=grad)
                    (primal.pow(2).sum() + tangent.pow(2).sum()).backward()
                    grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
                assert torch.allclose(grads[0], grads[1], atol=1e-10), (backend, grad)
                assert sum(reduced) == n_params, (backend, grad, reduced)
    finally:
        dist.destroy_process_group()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown JVP backend"):
        jvp(torch.sin, (torch.zeros(2),), (torch.ones(2),), backend="nope")
    with pytest.raises(ValueError, match="tangent 0 has shape"):
        jvp(torch.sin, (torch.zeros(2),), (torch.ones(3),))
    with pytest.raises(ValueError, match="finite-difference step must be positive"):
        jvp(torch.sin, (torch.zeros(2),), (torch.ones(2),), backend="finite_difference", fd_step=0.0)
    model = _network()
    x, s, t, v = _inputs()
    with pytest.raises(ValueError, match="unknown gradient mode"):
        flow_jvp(model, x, s, t, grad="some")
    with pytest.raises(ValueError, match="output must be"):
        flow_jvp(model, x, s, t, output="G")
    with pytest.raises(ValueError, match="tangent dx has shape"):
        flow_jvp(model, x, s, t, dx=v[:, :1])
    with pytest.raises(ValueError, match="tangent ds must be"):
        flow_jvp(model, x, s, t, ds=torch.ones(3))
    with pytest.raises(ValueError, match="s and t of shape"):
        flow_jvp(model, x, s[:4], t)
    with pytest.raises(ValueError, match="stop-gradient tangents only"):
        flow_jvp(model, x, s, t, grad="full", tangent_dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown jvp_backend"):
        flow_jvp(model, x, s, t, backend="nope")


@pytest.mark.parametrize("settings", [dict(), dict(num_freqs=3, x_features=8, x_scale=2.0), dict(num_classes=3)],
                         ids=["plain", "fourier", "classes"])
@pytest.mark.parametrize("output", ["F", "V"])
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_fused_tangent_matches_forward_mode_with_its_gradients(settings, output, grad):
    """The MLP's closed-form tangent equals ``torch.func.jvp`` through its ordinary forward, and so do
    the parameter gradients of a loss on both outputs, in every gradient mode."""
    torch.manual_seed(0)
    model = FlowMap(MLP(2, width=24, depth=3, **settings)).double()
    x, s, t, v = _inputs(16)
    cond = torch.arange(16) % 3 if settings.get("num_classes") else None
    ds, dt = torch.linspace(-1, 1, 16, dtype=torch.float64), 0.7
    results = {}
    for backend in ("func", "fused"):
        model.zero_grad()
        primal, tangent = flow_jvp(model, x, s, t, cond, dx=v, ds=ds, dt=dt, output=output, backend=backend, grad=grad)
        loss = primal.pow(2).sum() + (primal * tangent).sum()
        if grad != "none":
            loss.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        results[backend] = (primal.detach(), tangent.detach(), torch.cat([g.flatten() for g in grads]))
    for a, b in zip(results["func"], results["fused"]):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), (a - b).abs().max()
    assert resolve_backend(model, "auto") == "fused"


def test_fused_tangent_matches_finite_differences_of_the_fourier_features():
    """Independent of any autodiff: the closed-form tangent of x- and time-Fourier features matches a
    float64 central difference."""
    torch.manual_seed(1)
    model = FlowMap(MLP(2, width=16, depth=2, num_freqs=4, max_freq=4.0, x_features=16, x_scale=3.0)).double()
    x, s, t, v = _inputs(32)
    _, fused = flow_jvp(model, x, s, t, dx=v, ds=0.3, dt=-0.5, backend="fused", grad="none")
    _, fd = flow_jvp(model, x, s, t, dx=v, ds=0.3, dt=-0.5, backend="finite_difference", grad="none", fd_step=1e-6)
    assert torch.allclose(fused, fd, atol=1e-7), (fused - fd).abs().max()


def test_fused_backend_needs_a_backbone_that_supports_it(exact_gaussian_map):
    """``auto`` falls back to ``func`` for backbones without their own tangent (the oracle, an MLP with
    inserted dropout); asking for ``fused`` there is a clear error."""
    dropped = _network(dropout=0.5)
    for model in (exact_gaussian_map, dropped):
        assert resolve_backend(model, "auto") == "func"
    x, s, t, v = _inputs()
    with pytest.raises(ValueError, match="does not compute its own tangents"):
        flow_jvp(dropped, x, s, t, dx=v, backend="fused")
    with pytest.raises(ValueError, match="knows only the linear and SiLU layers"):
        dropped.net.forward_with_tangent(x, s, t, None, v, s, t)
    with pytest.raises(ValueError, match="'fused' and 'auto' need a FlowMap"):
        jvp(torch.sin, (torch.zeros(2),), (torch.ones(2),), backend="fused")
