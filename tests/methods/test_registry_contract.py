"""The contract every registered method meets, driven by the registry (no hand-kept list of names).

For each name in ``method_names()``, with the method's own default options:

- the exact Gaussian flow map is a fixed point of the loss's (semi-)gradient within Monte-Carlo error
  (the map of the opposite convention is not), and the update restores the exact map when perturbed,
  under the method's ``exact_limit`` options (its consistent limit);
- one training step of a small MLP gives a finite loss and a finite gradient on every trainable
  parameter (the trainer-owned auxiliary networks included);
- a run through the trainer, interrupted after a checkpoint and resumed, ends bit-identical to the
  uninterrupted run (method state, target networks and auxiliary networks checkpointed);
- its own sampler reproduces the exact map where the method's map is defined (every step count for
  composed maps, the exact marginals for consistency maps, one step for maps trained from ``s = 1``).

A method registered without passing these fails the suite.
"""

import copy
import dataclasses
import json
import shutil

import pytest
import torch

from flowmaps.build import config_from_dict
from flowmaps.flow_map import FlowMap
from flowmaps.methods import Batch, LossContext, build_method, get_method_class, method_names
from flowmaps.nets import MLP
from flowmaps.oracle import Gaussian, GaussianMixture
from flowmaps.samplers import get_sampler
from flowmaps.teachers import ExactTeacher, FlowMapTeacher
from flowmaps.train.loop import train
from tests.methods.exact_checks import assert_exact_samples, assert_fixed_point, assert_restoring
from tests.methods.exact_models import exact_model
from tests.train.tiny import assert_same_tensors, tiny_values, weights

NAMES = method_names()
LATE = LossContext(step=9, total_steps=10)  # curricula at their end: the finest grids, the full tangent


def teacher_for(name, target):
    """The exact oracle; a frozen exact map for methods that copy a network's weights (ECT)."""
    cls = get_method_class(name)
    if not cls.needs_teacher:
        return None
    return FlowMapTeacher(exact_model(target)) if cls.initializes_from_teacher else ExactTeacher(target)


def context_for(method, dim, base=LATE):
    """``base`` with the auxiliary networks the trainer would build for ``method``."""
    networks = {k: a.module.double() for k, a in method.auxiliary_networks((dim,)).items()}
    return LossContext(base.step, base.total_steps, base.ema_model, networks)


@pytest.fixture(scope="module")
def gaussian():
    return Gaussian([0.5, -1.0], [0.3, 0.6])


@pytest.mark.parametrize("name", NAMES)
def test_the_exact_map_is_a_stationary_and_restoring_point(name, gaussian):
    options = get_method_class(name).exact_limit
    method = build_method(name, gaussian.schedule, teacher=teacher_for(name, gaussian), **options)
    ctx = context_for(method, 2)
    assert_fixed_point(method, gaussian, batches=16, ctx=ctx)
    assert_restoring(method, gaussian, ctx=ctx)


@pytest.mark.parametrize("name", NAMES)
def test_one_step_gives_a_finite_loss_and_a_gradient_on_every_parameter(name, gaussian):
    torch.manual_seed(0)
    model = FlowMap(MLP(2, width=16, depth=2)).double()
    teacher = teacher_for(name, gaussian)
    if get_method_class(name).initializes_from_teacher:
        teacher = FlowMapTeacher(copy.deepcopy(model))
    method = build_method(name, gaussian.schedule, teacher=teacher)
    method.initialize(model)
    ctx = context_for(method, 2)
    batch = Batch(gaussian.sample(128, torch.Generator().manual_seed(1)).double())
    out = method.loss(model, batch, torch.Generator().manual_seed(2), ctx)
    assert torch.isfinite(out.loss) and out.terms, (name, out)
    total = out.loss if out.auxiliary_loss is None else out.loss + out.auxiliary_loss
    total.backward()
    modules = [model, *ctx.auxiliary.values()]
    for module in modules:
        for pname, p in module.named_parameters():
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), (name, pname)
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters()), name


MIXTURE = {"weights": [0.6, 0.4], "means": [[-1.0, 0.5], [1.0, -0.5]], "stds": [[0.3, 0.2], [0.2, 0.4]]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A mixture data file and a trained fm run (the teacher of methods initialised from a network)."""
    root = tmp_path_factory.mktemp("registry")
    data = root / "mix.json"
    data.write_text(json.dumps(MIXTURE))
    fm = train(_config(data, "fm", None), root / "fm-teacher", progress=False, evaluate_at_end=False).run_dir
    return root, data, fm


def _config(data, name, teacher, steps=6):
    values = tiny_values(data, method={"name": name}, train={"steps": steps, "batch_size": 32},
                         checkpoint={"every": 3, "keep_last": 3})
    return config_from_dict({**values, "teacher": teacher})


@pytest.mark.parametrize("name", NAMES)
def test_an_interrupted_run_resumes_bit_identically(name, runs):
    root, data, fm = runs
    cls = get_method_class(name)
    teacher = None if not cls.needs_teacher else str(fm) if cls.initializes_from_teacher else "exact"
    cfg = _config(data, name, teacher)
    full = train(cfg, root / name / "full", progress=False, evaluate_at_end=False).run_dir
    cut = root / name / "cut"
    shutil.copytree(full, cut)
    checkpoints = sorted((cut / "checkpoints").glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_00000003", "step_00000006"], checkpoints
    shutil.rmtree(checkpoints[1])  # the run now ends at its step-3 checkpoint: 3 more steps to redo
    for final in ("model.safetensors", "model_ema.safetensors"):
        (cut / final).unlink()
    train(cfg, cut, progress=False, evaluate_at_end=False, resume=True)
    for final in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(weights(full / final), weights(cut / final))


def _mixture():
    return GaussianMixture(torch.tensor(MIXTURE["weights"]), torch.tensor(MIXTURE["means"]),
                           torch.tensor(MIXTURE["stds"]))


@pytest.mark.parametrize("name", NAMES)
def test_the_method_sampler_reproduces_the_exact_map(name):
    target = _mixture()
    model = exact_model(target)
    sampler = get_sampler(get_method_class(name).sampler)
    noise = torch.randn(3000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = target.flow_map(noise, torch.ones(3000, dtype=torch.float64), torch.zeros(3000, dtype=torch.float64))
    with torch.no_grad():
        if not sampler.exact_at_every_step_count:  # an ODE sampler: first-order convergence to the exact map
            errors = [float((sampler.sample(model, noise, k) - exact).norm(dim=1).mean()) for k in (64, 256)]
            assert errors[1] < 0.35 * errors[0] and errors[1] < 0.02, errors
            return
        one = sampler.sample(model, noise, 1, schedule=target.schedule)
        assert torch.allclose(one, exact, atol=1e-5)
        if sampler.max_steps is None:
            four = sampler.sample(model, noise, 4, schedule=target.schedule, generator=torch.Generator().manual_seed(1))
            if sampler.deterministic:  # composing exact jumps gives the exact map
                assert torch.allclose(four, one, atol=1e-5), name
            else:  # re-noised exact jumps give exact samples of the data
                assert_exact_samples(four, target)
        else:
            with pytest.raises(ValueError, match="at most 1 step"):
                sampler.sample(model, noise, 2)


WARMING = [n for n in NAMES if "diagonal_warmup" in {f.name for f in dataclasses.fields(get_method_class(n).Options)}]


@pytest.mark.parametrize("name", WARMING)
def test_the_diagonal_warmup_trains_flow_matching_on_the_whole_batch_then_the_rule(name, gaussian):
    """``diagonal_warmup = 0.5``: before half-way the loss is the diagonal term of every row (the
    method's diagonal target, no rule or auxiliary term); from half-way the method's own terms."""
    method = build_method(name, gaussian.schedule, teacher=teacher_for(name, gaussian), diagonal_warmup=0.5)
    model = exact_model(gaussian, "sign_flipped")
    batch = Batch(gaussian.sample(64, torch.Generator().manual_seed(1)).double())
    early_ctx, late_ctx = (context_for(method, 2, LossContext(step, 10)) for step in (4, 5))
    early = method.loss(model, batch, torch.Generator().manual_seed(2), early_ctx)
    assert set(early.terms) == {"diagonal"} and early.auxiliary_loss is None, (name, early.terms)
    draw = method.draw(batch, torch.Generator().manual_seed(2), early_ctx)
    assert draw.n_diag == 64
    assert torch.allclose(early.loss, method.diagonal_loss(model, draw).mean())
    late = method.loss(model, batch, torch.Generator().manual_seed(2), late_ctx)
    assert set(late.terms) - {"diagonal"}, (name, late.terms)
