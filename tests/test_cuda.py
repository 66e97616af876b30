"""The same checks on CUDA: exact residuals, every method's training step, the fused tangent, the
samplers and a training run that resumes bit-identically.

CI has no GPU, so these skip there; on a GPU machine run ``pytest tests/test_cuda.py``. Random
numbers come from CUDA generators and every tensor is created on the GPU, so a CPU-only assumption
anywhere in a method, a sampler or the loop fails here.
"""

import shutil

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.jvp import flow_jvp
from flowmaps.methods import Batch, LossContext, build_method, get_method_class, method_names
from flowmaps.nets import MLP, backbone_entry, build_backbone
from flowmaps.samplers import sample_consistency, sample_flow_map, sample_ode
from flowmaps.schedules import LinearSchedule
from flowmaps.teachers import FlowMapTeacher
from flowmaps.train.config import ModelConfig
from flowmaps.train.loop import train
from flowmaps.train.precision import with_precision
from tests.methods import test_compositional, test_eulerian, test_lagrangian
from tests.methods.exact_checks import assert_vanishes
from tests.train.test_loop import _assert_same_run
from tests.train.tiny import tiny_config, write_array_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")

RULES = [(test_lagrangian, name) for name in ("lmd", "lsd", "ayf-lmd", "freeflow")] + [
    (test_eulerian, name) for name in ("emd", "esd", "ayf-emd")]


@pytest.mark.parametrize("family,name", RULES, ids=[name for _, name in RULES])
def test_rule_residuals_vanish_at_the_exact_map_on_cuda(gaussian, family, name):
    case = family.CASES[name]
    assert_vanishes(family.make(name, gaussian), gaussian, case["term"], case.get("tol", 1e-10),
                    case.get("grad_tol", 1e-6), device=CUDA)


@pytest.mark.parametrize("name", ["psd-u", "psd-m", "splitmeanflow", "pfmm"])
def test_compositional_rules_vanish_at_the_exact_map_on_cuda(gaussian, name):
    method = test_compositional._rule_only(name, gaussian)
    assert_vanishes(method, gaussian, method.rule_term, tol=1e-14, grad_tol=1e-9, device=CUDA)


@pytest.mark.parametrize("name", method_names())
def test_every_method_takes_training_steps_on_cuda(name):
    """Three Adam steps of an MLP flow map on the GPU: finite losses and diagnostics, a gradient on
    the GPU for every parameter, and weights that move."""
    torch.manual_seed(0)
    model = FlowMap(MLP(2, 64, 3)).to(CUDA)
    teacher = None
    if get_method_class(name).needs_teacher:
        teacher = FlowMapTeacher(FlowMap(MLP(2, 64, 3)).to(CUDA))
    method = build_method(name, LinearSchedule(), teacher=teacher)
    method.initialize(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator(device=CUDA).manual_seed(0)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        x = torch.randn(256, 2, generator=g, device=CUDA)
        out = method.loss(model, Batch(x), g, LossContext(step, 3))
        assert out.loss.device.type == "cuda" and torch.isfinite(out.loss), (name, out.loss)
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.terms.values()), out.terms
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        for p in model.parameters():
            assert p.grad is not None and p.grad.device.type == "cuda" and torch.isfinite(p.grad).all(), name
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name


@pytest.mark.parametrize("grad", ["primal", "full"])
def test_fused_tangent_equals_forward_mode_on_cuda(grad):
    torch.manual_seed(0)
    model = FlowMap(MLP(2, width=48, depth=3, num_freqs=4, x_features=16, x_scale=1.5)).double().to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(1)
    x, v = (torch.randn(64, 2, generator=g, device=CUDA, dtype=torch.float64) for _ in range(2))
    s = torch.rand(64, generator=g, device=CUDA, dtype=torch.float64)
    t = s * torch.rand(64, generator=g, device=CUDA, dtype=torch.float64)
    results = {}
    for backend in ("func", "fused"):
        model.zero_grad()
        primal, tangent = flow_jvp(model, x, s, t, dx=v, ds=1.0, output="V", backend=backend, grad=grad)
        (primal.pow(2).sum() + (primal * tangent).sum()).backward()
        results[backend] = torch.cat([primal.flatten(), tangent.detach().flatten()]
                                     + [p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(results["func"], results["fused"], atol=1e-11, rtol=1e-9)


def test_samplers_reproduce_the_exact_map_on_cuda(exact_gaussian_map, gaussian):
    """The exact map composes: 1, 4 and 8 jumps land on the same points, and the diagonal ODE at 256
    Heun steps approaches them; re-noising with the exact map keeps the exact data marginal."""
    model = exact_gaussian_map.to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    noise = torch.randn(4096, 3, generator=g, device=CUDA, dtype=torch.float64)
    one = sample_flow_map(model, noise, 1)
    assert one.device.type == "cuda"
    for n in (4, 8):
        assert torch.allclose(sample_flow_map(model, noise, n), one, atol=1e-9)
    assert torch.allclose(sample_ode(model, noise, 256, solver="heun"), one, atol=1e-4)
    renoised = sample_consistency(model, noise, 4, gaussian.schedule, g)
    exact = gaussian.sample(4096, g, CUDA).double()
    assert torch.allclose(renoised.mean(0), exact.mean(0), atol=0.1)
    assert torch.allclose(renoised.std(0), exact.std(0), rtol=0.1)


@pytest.mark.parametrize("method", ["fm", "lsd"])
def test_training_on_cuda_resumes_bit_identically(tmp_path, method):
    """A CUDA run cut at step 16 of 24 and resumed ends with the weights, optimiser, EMA, data order,
    generators and log of the uninterrupted run, then evaluates on the GPU."""
    cfg = tiny_config(write_array_data(tmp_path / "data.npy", rows=150), method={"name": method},
                      train={"device": "cuda"})
    train(cfg, tmp_path / "full", progress=False, evaluate_at_end=True)
    assert (tmp_path / "full" / "metrics.json").is_file()
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for name in ("model.safetensors", "model_ema.safetensors"):
        (tmp_path / "cut" / name).unlink()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000024")
    train(cfg, tmp_path / "cut", progress=False, evaluate_at_end=False, resume=True)
    _assert_same_run(tmp_path / "full", tmp_path / "cut", 24)


@pytest.mark.parametrize("name", ["lsd", "meanflow", "scm"])
@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_image_backbones_train_with_labels_under_bf16_autocast_on_cuda(backbone, name):
    """A class-conditional image backbone under bf16 autocast (``train.precision=bf16``): the time
    embeddings stay float32, the loss is finite and every parameter gets a finite gradient on the GPU."""
    entry = backbone_entry(backbone)
    shape = entry.options.test_shape
    torch.manual_seed(0)
    model = FlowMap(build_backbone(ModelConfig(backbone, 3, dict(entry.options.tiny)), shape), shape=shape,
                    num_classes=3).to(CUDA)
    method = build_method(name, LinearSchedule())
    g = torch.Generator(device=CUDA).manual_seed(0)
    batch = Batch(torch.randn(16, *shape, generator=g, device=CUDA), torch.arange(16, device=CUDA) % 3)
    out = method.loss(with_precision(model, "bf16", CUDA), batch, g, LossContext(0, 10))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.is_cuda and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
