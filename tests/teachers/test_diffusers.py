"""diffusers teachers (spec §8): deterministic DDIM (``eta = 0``) on a diffusers UNet is the Euler step of
our ODE on the adapted velocity at the mapped times, so the two trajectories agree to round-off.

A tiny random-weight ``UNet2DModel`` and a ``DDPMScheduler`` are saved as diffusers saves them; the
teacher is loaded from that folder. Our trajectory lives on the linear path, ``x_T = k(t) x`` with
``k = teacher.state_scale(t)`` at every time the table covers; the last DDIM step lands on data
(``final_alpha_cumprod = 1``), our ``t = 0``, where both states are the same.
"""

import sys

import pytest
import torch

from flowmaps.data.sources import DataSource
from flowmaps.samplers import sample_ode
from flowmaps.teachers import load_teacher
from flowmaps.teachers.conventions import ddpm_betas
from tests.teachers import require_diffusers

STEPS = 10


def save_teacher(root, prediction_type: str = "epsilon", num_class_embeds=None, **scheduler):
    """A tiny random UNet (``[1, 8, 8]`` samples) and a DDPM scheduler in ``root/unet``, ``root/scheduler``."""
    diffusers = require_diffusers()
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, num_class_embeds=num_class_embeds)
    unet.save_pretrained(root / "unet")
    diffusers.DDPMScheduler(prediction_type=prediction_type, clip_sample=False, **scheduler).save_pretrained(
        root / "scheduler")
    return root


def ddim_trajectory(root, noise: torch.Tensor, class_labels=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """diffusers' own DDIM (``eta = 0``, float64 UNet) from ``noise``: its timesteps and states."""
    diffusers = require_diffusers()
    unet = diffusers.UNet2DModel.from_pretrained(root / "unet").double().eval()
    ddim = diffusers.DDIMScheduler.from_pretrained(root / "scheduler")
    ddim.set_timesteps(STEPS)
    states = [noise]
    with torch.no_grad():
        for k in ddim.timesteps:
            output = unet(states[-1], k, class_labels=class_labels).sample
            states.append(ddim.step(output, k, states[-1], eta=0.0).prev_sample)
    return ddim.timesteps, states


def euler_trajectory(teacher, grid: torch.Tensor, x: torch.Tensor, cond=None) -> list[torch.Tensor]:
    """``sample_ode`` (Euler) on the teacher's velocity, one grid interval at a time."""

    def model(x, s, t, cond=None, output="V"):
        return teacher.velocity(x, s, cond)

    states = [x]
    with torch.no_grad():
        for i in range(grid.numel() - 1):
            states.append(sample_ode(model, states[-1], grid[i:i + 2], "euler", cond))
    return states


def assert_same_trajectory(teacher, root, class_labels=None, cond=None):
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    timesteps, ddim = ddim_trajectory(root, noise, class_labels)
    grid = torch.cat([teacher.our_time(timesteps.double()), torch.zeros(1, dtype=torch.float64)])
    ours = euler_trajectory(teacher, grid, noise / teacher.state_scale(grid[0]), cond)
    scales = [teacher.state_scale(t) for t in grid[:-1]] + [1.0]  # the last state is data in both conventions
    for i, (theirs, mine, k) in enumerate(zip(ddim, ours, scales)):
        error = float((mine * k - theirs).abs().max() / theirs.abs().max())
        assert error < 1e-5, (i, error)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_euler_on_the_adapted_teacher_reproduces_ddim(tmp_path, prediction_type):
    diffusers = require_diffusers()
    root = save_teacher(tmp_path, prediction_type)
    teacher = diffusers_teacher(root)
    assert teacher.shape == (1, 8, 8) and teacher.num_classes == 0
    assert teacher.prediction.name == prediction_type
    assert not any(p.requires_grad for p in teacher.unet.parameters()) and not teacher.unet.training
    assert isinstance(teacher.unet, diffusers.UNet2DModel)
    assert_same_trajectory(teacher, root)


def diffusers_teacher(root):
    from flowmaps.teachers.diffusers import load_diffusers_teacher

    return load_diffusers_teacher(root, dtype=torch.float64)


def test_class_conditional_teacher_maps_the_null_label_to_the_last_embedding(tmp_path):
    root = save_teacher(tmp_path, "epsilon", num_class_embeds=4, beta_schedule="squaredcos_cap_v2")
    teacher = diffusers_teacher(root)
    assert teacher.num_classes == 3 and teacher.path.name == "vp_squaredcos_cap_v2"
    assert_same_trajectory(teacher, root, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, -1]))
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    null = teacher.velocity(x, 0.4, torch.tensor([-1, -1]))
    assert torch.equal(teacher.velocity(x, 0.4), null)
    assert not torch.allclose(teacher.velocity(x, 0.4, torch.tensor([0, 1])), null)
    with pytest.raises(ValueError, match="out of range"):
        teacher.velocity(x, 0.4, torch.tensor([0, 3]))


def test_flow_match_and_euler_schedulers(tmp_path):
    """Under ``FlowMatchEulerDiscreteScheduler`` (rectified flow) our linear velocity is the UNet's output
    at the timestep ``1000 t``; under ``EulerDiscreteScheduler`` the teacher is the DDPM scheduler's."""
    diffusers = require_diffusers()
    root = save_teacher(tmp_path, "v_prediction")
    ddpm = diffusers_teacher(root)
    diffusers.EulerDiscreteScheduler(prediction_type="v_prediction").save_pretrained(root / "scheduler")
    euler = diffusers_teacher(root)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    assert euler.path.name == "vp_linear" and euler.prediction.name == "v_prediction"
    assert torch.equal(euler.velocity(x, t), ddpm.velocity(x, t))
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(root / "scheduler")
    flow = diffusers_teacher(root)
    assert flow.path.name == "rectified_flow" and flow.prediction.name == "flow"
    with torch.no_grad():
        expected = flow.unet(x, 1000 * t).sample
    assert torch.allclose(flow.velocity(x, t), expected, rtol=1e-12, atol=1e-12)


def test_the_scheduler_tables_are_the_written_out_betas():
    diffusers = require_diffusers()
    for schedule, start, end in (("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                 ("squaredcos_cap_v2", 1e-4, 0.02)):
        theirs = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=start, beta_end=end).betas
        assert torch.allclose(ddpm_betas(schedule, 1000, start, end).float(), theirs, rtol=1e-5, atol=1e-9), schedule


def test_load_teacher_takes_a_diffusers_folder_and_checks_it_against_the_data(tmp_path):
    root = save_teacher(tmp_path, "v_prediction", num_class_embeds=3)
    teacher = load_teacher(f"diffusers:{root}")
    assert teacher.shape == (1, 8, 8) and teacher.num_classes == 2
    assert teacher.velocity(torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.9])).shape == (2, 1, 8, 8)

    class Images(DataSource):
        name, shape, num_classes = "images", (1, 8, 8), 2

    assert load_teacher(f"diffusers:{root}", Images(), "cpu").num_classes == 2
    Images.num_classes = 5
    with pytest.raises(ValueError, match=r"shape \[1, 8, 8\] with 2 classes; 'images' has .* with 5 classes"):
        load_teacher(f"diffusers:{root}", Images())
    Images.shape, Images.num_classes = (2,), 2
    with pytest.raises(ValueError, match=r"'images' has samples of shape \[2\]"):
        load_teacher(f"diffusers:{root}", Images())


def test_named_errors(tmp_path):
    save_teacher(tmp_path / "plain")
    with pytest.raises(ValueError, match="no class embedding"):
        diffusers_teacher(tmp_path / "plain").velocity(torch.zeros(2, 1, 8, 8, dtype=torch.float64), 0.5,
                                                       torch.tensor([0, 1]))
    (tmp_path / "empty" / "scheduler").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no unet/"):
        load_teacher(f"diffusers:{tmp_path / 'empty'}")
    save_teacher(tmp_path / "bad", "x0")
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        load_teacher(f"diffusers:{tmp_path / 'bad'}")
    diffusers = require_diffusers()
    diffusers.PNDMScheduler().save_pretrained(tmp_path / "bad" / "scheduler")
    with pytest.raises(ValueError, match="scheduler 'PNDMScheduler' is not supported"):
        load_teacher(f"diffusers:{tmp_path / 'bad'}")


def test_missing_diffusers_names_the_extra(monkeypatch):
    from flowmaps.teachers.diffusers import import_diffusers

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install flowmaps\[diffusers\]"):
        import_diffusers()
