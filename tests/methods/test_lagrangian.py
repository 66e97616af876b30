"""Lagrangian methods at the exact Gaussian flow map: residuals vanish, wrong conventions are
rejected, and away from the exact map the update points back to it."""

import dataclasses

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.methods import Batch, LossContext, build_method, get_method_class
from flowmaps.oracle import ExactAverageVelocity, Gaussian
from flowmaps.methods.lagrangian.freeflow import DENOISER
from flowmaps.teachers import ExactTeacher
from flowmaps.train.auxiliary import AuxiliaryNetworks
from flowmaps.train.distributed import DistributedContext
from tests.methods.exact_checks import (
    assert_rejects, assert_restoring, assert_stationary, assert_vanishes, loss_and_grad,
)
from tests.methods.exact_models import exact_model

# per method: the name of the rule's term, options for the exact checks, tolerances
CASES = {
    "lmd": dict(term="lagrangian"),
    "lsd": dict(term="lagrangian", options=dict(diagonal_fraction=0.0)),
    "ayf-lmd": dict(term="lagrangian"),
    "tvm": dict(term="terminal"),
    # forward finite difference: O(h) residual
    "pid": dict(term="lagrangian", options=dict(fd_step=1e-5), tol=1e-8, grad_tol=1e-3),
    # the auxiliary network is the exact velocity and is not trained, so the correction is exact too
    "freeflow": dict(term="prediction", options=dict(correction_warmup=0.0)),
}


def with_denoiser(method, denoiser):
    """``method`` whose losses see ``denoiser`` as FreeFlow's auxiliary network (the trainer's role)."""
    loss = method.loss

    def loss_with_denoiser(model, batch, generator, ctx=None):
        return loss(model, batch, generator, dataclasses.replace(ctx or LossContext(), auxiliary={DENOISER: denoiser}))

    method.loss = loss_with_denoiser
    return method


def make(name, target, exact_options=True, **options):
    """The method with the options of ``CASES`` (``exact_options``) or its paper defaults; FreeFlow's
    auxiliary network is always the exact velocity (and untrained)."""
    cls = get_method_class(name)
    teacher = ExactTeacher(target) if cls.needs_teacher else None
    base = CASES[name].get("options", {}) if exact_options else {}
    if name == "freeflow":
        base = {**CASES[name]["options"], **base}
    method = build_method(name, target.schedule, teacher=teacher, **{**base, **options})
    if name == "freeflow":
        with_denoiser(method, FlowMap(ExactAverageVelocity(target)))
    return method


@pytest.mark.parametrize("name", ["lmd", "lsd", "ayf-lmd", "pid", "freeflow"])
def test_residual_and_gradient_vanish_at_exact_map(gaussian, name):
    case = CASES[name]
    assert_vanishes(make(name, gaussian), gaussian, case["term"], case.get("tol", 1e-10), case.get("grad_tol", 1e-6))


def test_freeflow_correction_vanishes_at_exact_map(gaussian):
    out, _ = loss_and_grad(make("freeflow", gaussian), exact_model(gaussian), gaussian)
    assert out.terms["correction"] < 1e-20


def test_tvm_terminal_term_vanishes_and_flow_matching_term_is_stationary(gaussian):
    """TVM puts its flow-matching term on every row, so only its terminal term vanishes exactly."""
    for decay in (0.99, 0.0):
        out, _ = loss_and_grad(make("tvm", gaussian, target_ema_decay=decay), exact_model(gaussian), gaussian)
        assert out.terms["terminal"] < 1e-10
    assert_stationary(make("tvm", gaussian), gaussian)


@pytest.mark.parametrize("name", list(CASES))
def test_sign_flipped_map_is_rejected(gaussian, name):
    assert_rejects(make(name, gaussian), gaussian, CASES[name]["term"], "sign_flipped")


@pytest.mark.parametrize("name", ["lmd", "ayf-lmd", "pid", "freeflow"])
def test_teacher_methods_reject_the_time_reversed_convention(gaussian, name):
    """The time-reversed map is a flow map of the reversed ODE: only the teacher ties it to the data."""
    assert_rejects(make(name, gaussian), gaussian, CASES[name]["term"], "time_reversed")


@pytest.mark.parametrize("name", ["lsd", "tvm"])
def test_self_distillation_diagonal_is_stationary(gaussian, name):
    options = dict(diagonal_fraction=1.0) if name == "lsd" else {}
    assert_stationary(make(name, gaussian, **options), gaussian)


@pytest.mark.parametrize("name", list(CASES))
def test_update_points_back_to_the_exact_map(gaussian, name):
    """With the paper defaults (a consistency term alone, without the diagonal that anchors it, need
    not be monotone along one perturbation direction)."""
    assert_restoring(make(name, gaussian, exact_options=False), gaussian)


def test_ayf_lmd_tangent_normalisation_keeps_the_fixed_point(gaussian):
    method = make("ayf-lmd", gaussian, tangent_norm_c=0.1, time_weight="gap")
    assert_vanishes(method, gaussian, "lagrangian")
    assert_restoring(method, gaussian)


@pytest.mark.parametrize("backend", ["forward_ad", "double_backward", "finite_difference"])
@pytest.mark.parametrize("name", ["lmd", "ayf-lmd"])
def test_backends_give_the_same_loss_and_gradient(gaussian, name, backend):
    ref_out, ref_grad = _perturbed(make(name, gaussian), gaussian)
    out, grad = _perturbed(make(name, gaussian, jvp_backend=backend), gaussian)
    tol = 1e-6 if backend == "finite_difference" else 1e-10
    assert abs(out.loss.item() - ref_out.loss.item()) < tol * max(1.0, ref_out.loss.item())
    assert abs(grad - ref_grad) < 1e3 * tol * max(1.0, abs(ref_grad))


def _perturbed(method, target, delta=0.3):
    model = exact_model(target)
    with torch.no_grad():
        model.net.delta.fill_(delta)
    return loss_and_grad(method, model, target, n=512)


def test_freeflow_correction_moves_samples_towards_the_data():
    """Student samples from a shifted Gaussian: the correction's descent direction on a bias of the
    one-step map points from the student's mean towards the data mean."""
    real = Gaussian([0.5, -1.0], [0.4, 0.6])
    fake = Gaussian([1.0, -0.5], [0.4, 0.6])

    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.exact = ExactAverageVelocity(fake)
            self.bias = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self, x, s, t, cond=None):
            return self.exact(x, s, t) + self.bias

    grads = {}
    for weight in (0.0, 1.0):
        method = build_method("freeflow", real.schedule, teacher=ExactTeacher(real), correction_warmup=0.0,
                              correction_weight=weight)
        with_denoiser(method, FlowMap(ExactAverageVelocity(fake)))  # the student's sample distribution
        model = FlowMap(Shifted())
        g = torch.Generator().manual_seed(0)
        out = method.loss(model, Batch(torch.zeros(4096, 2, dtype=torch.float64)), g, LossContext(1, 1))
        out.loss.backward()
        grads[weight] = model.net.bias.grad.clone()
    correction_grad = grads[1.0] - grads[0.0]
    # samples are x_hat = noise - V(noise, 1, 0); a descent step changes them by +lr * d loss / d bias
    towards_data = real.means[0] - fake.means[0]
    assert float(correction_grad @ towards_data) > 0


def test_teacher_methods_refuse_to_start_without_a_teacher(gaussian):
    for name in ["lmd", "ayf-lmd", "pid", "freeflow"]:
        with pytest.raises(ValueError, match="--teacher RUN_DIR"):
            build_method(name, gaussian.schedule)


@pytest.mark.parametrize("name,options,message", [
    ("lmd", dict(jvp_backend="nope"), "jvp_backend of method 'lmd'"),
    ("lsd", dict(penalty="l1"), "penalty of method .lsd. must be one of"),
    ("ayf-lmd", dict(tangent_norm_c=-1.0), "tangent_norm_c"),
    ("tvm", dict(target_ema_decay=1.0), "target_ema_decay"),
    ("pid", dict(fd_step=0.0), "fd_step"),
    ("freeflow", dict(aux_lr=0.0), "aux_lr"),
    ("freeflow", dict(correction_warmup=2.0), "correction_warmup"),
    ("lsd", dict(time_weight="sigma"), "time_weight"),
])
def test_bad_options_are_named(gaussian, name, options, message):
    teacher = ExactTeacher(gaussian) if get_method_class(name).needs_teacher else None
    with pytest.raises(ValueError, match=message):
        build_method(name, gaussian.schedule, teacher=teacher, **options)


@pytest.mark.parametrize("name,options", [("tvm", {})])
def test_training_state_survives_a_checkpoint(gaussian, name, options):
    """TVM's EMA target goes through
    ``state_dict`` (saved with ``torch.save``, read with ``weights_only=True``): a restored method
    continues exactly as the original."""
    import io

    from flowmaps.nets import MLP

    teacher = ExactTeacher(gaussian) if get_method_class(name).needs_teacher else None
    torch.manual_seed(0)
    model = FlowMap(MLP(3, width=16, depth=2)).double()
    batch = Batch(gaussian.sample(64, torch.Generator().manual_seed(0)).double())
    original = build_method(name, gaussian.schedule, teacher=teacher, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        optimizer.zero_grad()
        original.loss(model, batch, torch.Generator().manual_seed(step), LossContext(step, 10)).loss.backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = build_method(name, gaussian.schedule, teacher=teacher, **options)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    outs = [m.loss(model, batch, torch.Generator().manual_seed(9), LossContext(3, 10)) for m in (original, restored)]
    assert outs[0].loss.item() == outs[1].loss.item()
    assert outs[0].terms.keys() == outs[1].terms.keys() and len(outs[0].terms) >= 2
    fresh = build_method(name, gaussian.schedule, teacher=teacher, **options)
    assert fresh.loss(model, batch, torch.Generator().manual_seed(9), LossContext(3, 10)).loss.item() != outs[0].loss.item()


def _freeflow_rank(rank: int, store: str, prefix: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flowmaps.nets import MLP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        target = Gaussian([0.5, -1.0], [0.3, 0.6])
        torch.manual_seed(100 + rank)  # the ranks start from different random states on purpose
        model = DDP(FlowMap(MLP(2, 16, 2)))
        method = build_method("freeflow", target.schedule, teacher=ExactTeacher(target), correction_warmup=0.0)
        context = DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        auxiliary = AuxiliaryNetworks(method.auxiliary_networks((2,)), context)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        generator = torch.Generator().manual_seed(rank)
        for step in range(3):
            auxiliary.zero_grad()
            out = method.loss(model, Batch(torch.zeros(32, 2)), generator, LossContext(step, 3, None, auxiliary.modules))
            (out.loss + out.auxiliary_loss).backward()
            auxiliary.step(scaler)
        weights = auxiliary.modules[DENOISER].parameters()
        torch.save(torch.cat([p.detach().flatten() for p in weights]), f"{prefix}{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_freeflow_auxiliary_network_is_the_same_on_every_rank(tmp_path):
    """DDP does not see FreeFlow's auxiliary network: its initial weights come from rank 0 and its
    gradients are averaged over the ranks, so two processes keep one network."""
    torch.multiprocessing.spawn(_freeflow_rank, args=(str(tmp_path / "store"), str(tmp_path / "aux")), nprocs=2)
    assert torch.equal(torch.load(tmp_path / "aux0.pt"), torch.load(tmp_path / "aux1.pt"))
