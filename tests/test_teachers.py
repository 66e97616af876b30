import copy
import json

import pytest
import torch

from flowmaps.data import get_data
from flowmaps.flow_map import FlowMap
from flowmaps.nets import MLP
from flowmaps.oracle import Gaussian
from flowmaps.schedules import LinearSchedule
from flowmaps.methods.targets import EMATarget
from flowmaps.teachers import ExactTeacher, VelocityTeacher, load_teacher


def test_velocity_teacher_converts_the_flow_matching_convention():
    """A velocity written with tau = 0 noise, tau = 1 data (x_tau = tau x_0 + (1 - tau) eps, velocity
    x_0 - eps) becomes ours, v = (x - f(x, t)) / t for the linear schedule."""
    gaussian = Gaussian([0.5, -1.0], [0.3, 1.5], schedule=LinearSchedule())

    def fm_velocity(x, tau):
        f = gaussian.denoiser(x, 1 - tau)
        return (f - x) / (1 - tau)[:, None]

    x = torch.randn(64, 2, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(64, dtype=torch.float64)
    converted = VelocityTeacher(fm_velocity, time_reversed=True).velocity(x, t)
    assert torch.allclose(converted, gaussian.velocity(x, t), atol=1e-10)
    assert not torch.allclose(VelocityTeacher(fm_velocity).velocity(x, t), gaussian.velocity(x, t), atol=1e-2)
    assert torch.allclose(VelocityTeacher(gaussian.velocity).velocity(x, 0.3), gaussian.velocity(x, 0.3))


def test_velocity_teacher_checks_its_callable():
    with pytest.raises(TypeError, match="needs a callable"):
        VelocityTeacher(3.0)
    with pytest.raises(ValueError, match="teacher velocity has shape"):
        VelocityTeacher(lambda x, t: x[:, :1]).velocity(torch.zeros(4, 2), 0.5)


def test_exact_teacher_is_differentiable_in_x():
    """LMD back-propagates through v_T(F(x_s, s, t), t) into the student's jump."""
    gaussian = Gaussian([0.5, -1.0], [0.3, 1.5])
    x = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ExactTeacher(gaussian).velocity(x, torch.full((8,), 0.4)).sum(), x)
    assert grad.abs().sum() > 0


def test_ema_target_averages_and_evaluates_through_the_online_model():
    torch.manual_seed(0)
    model = FlowMap(MLP(2, width=8, depth=1))
    target = EMATarget(0.9)
    with pytest.raises(RuntimeError, match="before its first update"):
        target(model, torch.zeros(2, 2), torch.ones(2), torch.ones(2))
    target.update(model)
    first = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    target.update(model)
    averaged = copy.deepcopy(first)
    with torch.no_grad():
        for p in averaged.parameters():
            p.add_(0.1)  # 0.9 * p + 0.1 * (p + 1)
    x, s, t = torch.randn(5, 2), torch.rand(5), torch.rand(5)
    out = target(model, x, s, t)
    assert not out.requires_grad
    assert torch.allclose(out, averaged(x, s, t, output="V", check_times=False), atol=1e-6)
    assert not torch.allclose(out, model(x, s, t, output="V", check_times=False), atol=1e-3)
    with pytest.raises(ValueError, match="decay must lie in"):
        EMATarget(1.0)


def test_load_teacher_errors(tmp_path):
    checkerboard = get_data("checkerboard")
    with pytest.raises(ValueError, match="needs Gaussian-mixture data"):
        load_teacher("exact", checkerboard, torch.device("cpu"))
    with pytest.raises(ValueError, match="neither 'exact' nor a run directory"):
        load_teacher(str(tmp_path / "missing"), checkerboard, torch.device("cpu"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "data_info.json").write_text(json.dumps({"dim": 3, "name": "x"}))
    with pytest.raises(ValueError, match=r"trained on samples of shape \[3\]"):
        load_teacher(str(tmp_path / "run"), checkerboard, torch.device("cpu"))
    assert isinstance(load_teacher("exact", get_data("8gaussians"), torch.device("cpu")), ExactTeacher)


def test_exact_teacher_follows_the_training_schedule():
    from flowmaps.schedules import CosineSchedule

    data = get_data("8gaussians")
    cosine = CosineSchedule()
    teacher = load_teacher("exact", data, torch.device("cpu"), cosine)
    x, t = torch.randn(16, 2), torch.full((16,), 0.4)
    assert torch.allclose(teacher.velocity(x, t), data.mixture.with_schedule(cosine).velocity(x, t))
    assert not torch.allclose(teacher.velocity(x, t), data.mixture.velocity(x, t))
