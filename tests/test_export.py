"""Export to diffusers: diffusers' own ``FlowMapEulerDiscreteScheduler`` loop on an exported run is
``sample_flow_map`` on the same noise (float64), for 1, 2, 4 and 8 steps.

The run is a tiny class-conditional U-Net trained two steps on a labelled image-shaped mixture
(``[1, 4, 4]``, two classes) through the CLI; the other checks use random-weight maps built in place.
"""

import json

import numpy as np
import pytest
import torch

import flowmaps
from flowmaps.build import build_model, config_from_dict, resolve_config
from flowmaps.cli import main
from flowmaps.samplers import sample_flow_map, sample_ode
from tests.teachers import require_diffusers

SPEC = {"weights": [0.5, 0.5], "means": [[0.5] * 16, [-0.5] * 16], "stds": [[0.3] * 16, [0.3] * 16],
        "labels": [0, 1], "shape": [1, 4, 4]}


@pytest.fixture(scope="module", autouse=True)
def diffusers_installed():
    """Before the run is trained: every test here needs diffusers."""
    require_diffusers()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-run")
    (root / "spec.json").write_text(json.dumps(SPEC))
    assert main(["train", "--data", str(root / "spec.json"), "--out", str(root / "run"), "--steps", "2",
                 "--batch-size", "8", "--no-progress", "--set", "model.backbone=unet", "--set", "model.num_classes=2",
                 "--set", "eval.n_samples=16", "--set", "eval.ode_steps=1", "--set", "eval.nfe=[1]",
                 "--set", "train.device=cpu"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "pipe"
    assert main(["export", str(run_dir), "--diffusers", str(out)]) == 0
    return out


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_the_diffusers_scheduler_loop_is_sample_flow_map(run_dir, exported, steps):
    from flowmaps.export import FlowMapPipeline

    pipe = FlowMapPipeline.from_pretrained(exported, dtype=torch.float64)
    model = flowmaps.load(run_dir).double()
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pipe.flowmap.state_dict().items()) and len(state) > 0
    gen = torch.Generator().manual_seed(steps)
    with torch.no_grad():  # two training steps leave the zero-initialised output layer near zero: perturb both alike
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    pipe.flowmap.load_state_dict(model.state_dict())
    noise = torch.randn(6, 1, 4, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, -1, 0, 1, -1])
    with torch.no_grad():
        expected = sample_flow_map(model, noise, steps, labels)
        unconditional = sample_flow_map(model, noise, steps)
    images = pipe(steps, class_labels=labels, latents=noise).images
    assert torch.allclose(images, expected, rtol=0, atol=1e-12)
    assert (expected - noise).abs().max() > 0.1 and (expected - unconditional).abs().max() > 1e-3
    assert torch.allclose(pipe(steps, latents=noise).images, unconditional, rtol=0, atol=1e-12)
    array = pipe(steps, class_labels=[0, 1, -1, 0, 1, -1], latents=noise, output_type="np", return_dict=False)[0]
    assert isinstance(array, np.ndarray) and np.allclose(array, expected.numpy(), atol=1e-12)


def test_export_layout_and_generator_sampling(exported):
    from flowmaps.export import FlowMapPipeline

    diffusers = require_diffusers()
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "FlowMapPipeline" and index["scheduler"] == ["diffusers",
                                                                                "FlowMapEulerDiscreteScheduler"]
    assert isinstance(diffusers.FlowMapEulerDiscreteScheduler.from_pretrained(exported / "scheduler"),
                      diffusers.FlowMapEulerDiscreteScheduler)
    info = json.loads((exported / "flowmap" / "flowmap_config.json").read_text())
    assert info["shape"] == [1, 4, 4] and info["num_classes"] == 2 and info["model"]["backbone"] == "unet"
    pipe = FlowMapPipeline.from_pretrained(exported)
    a = pipe(2, class_labels=1, batch_size=3, generator=torch.Generator().manual_seed(0)).images
    b = pipe(2, class_labels=[1, 1, 1], generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (3, 1, 4, 4) and a.dtype == torch.float32 and torch.equal(a, b)


def _pipeline(sampler: str, num_classes: int = 0, guidance_range=None):
    """A random-weight MLP map on 2-D data with ``sampler``, under the diffusers scheduler (with the
    guidance input when ``guidance_range`` is given)."""
    from flowmaps.export import FlowMapPipeline

    diffusers = require_diffusers()
    torch.manual_seed(0)
    model_section = {"width": 16, "depth": 1, "num_classes": num_classes, "guidance": guidance_range is not None}
    cfg = resolve_config(config_from_dict({"model": model_section, "train": {"guidance_range": guidance_range}}), (2,))
    model = build_model(cfg, (2,)).double()
    model.sampler = sampler
    config = {"model": cfg.model.to_dict(), "schedule": "linear", "run": {}, "guidance_range": guidance_range}
    return FlowMapPipeline(model, diffusers.FlowMapEulerDiscreteScheduler(), config), model


def test_a_guidance_conditioned_map_takes_guidance_scale_and_survives_a_round_trip(tmp_path):
    """``guidance_scale`` reaches a guidance-conditioned model as the scale of every row (the map of
    ``Guided(labels, w)``), within its trained range."""
    from flowmaps.conditions import guided
    from flowmaps.export import FlowMapPipeline

    pipe, model = _pipeline("flow_map", num_classes=2, guidance_range=[1.0, 4.0])
    with torch.no_grad():
        for p in model.net.parameters():  # the guidance branch starts at zero: make it matter
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    noise = torch.randn(4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        expected = sample_flow_map(model, noise, 2, guided(labels, 3.0))
        plain = sample_flow_map(model, noise, 2, labels)
    images = pipe(2, class_labels=labels, latents=noise, guidance_scale=3.0).images
    assert torch.allclose(images, expected, rtol=0, atol=1e-12) and not torch.allclose(expected, plain, atol=1e-4)
    assert torch.allclose(pipe(2, class_labels=labels, latents=noise).images, plain, rtol=0, atol=1e-12)
    pipe.save_pretrained(tmp_path / "pipe")
    again = FlowMapPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float64)
    assert torch.allclose(again(2, class_labels=labels, latents=noise, guidance_scale=3.0).images, images, atol=1e-5)
    with pytest.raises(ValueError, match="outside the range this model was trained on"):
        pipe(2, class_labels=labels, latents=noise, guidance_scale=5.0)
    with pytest.raises(ValueError, match="needs class_labels"):
        pipe(2, latents=noise, guidance_scale=3.0)


def test_a_diffusion_model_runs_on_its_diagonal_and_survives_a_round_trip(tmp_path):
    from flowmaps.export import FlowMapPipeline

    pipe, model = _pipeline("ode")
    noise = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(pipe(4, latents=noise).images, sample_ode(model, noise, 4), rtol=0, atol=1e-12)
        assert not torch.allclose(pipe(4, latents=noise).images, sample_flow_map(model, noise, 4), atol=1e-3)
    pipe.save_pretrained(tmp_path / "pipe")
    again = FlowMapPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float64)
    assert torch.equal(again(4, latents=noise).images, pipe(4, latents=noise).images)


def test_named_errors(run_dir, tmp_path, capsys):
    pipe, _ = _pipeline("flow_map")
    with pytest.raises(ValueError, match="this model has no guidance input"):
        pipe(2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(2, class_labels=[0])
    with pytest.raises(ValueError, match="output_type"):
        pipe(1, output_type="pil")
    with pytest.raises(ValueError, match=r"latents must have shape \[2, 2\]"):
        pipe(1, batch_size=2, latents=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="one_step sampler takes at most 1 step"):
        _pipeline("one_step")[0](2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pipe(1, batch_size=0)
    with pytest.raises(ValueError, match="consistency sampler"):
        _pipeline("consistency")
    conditional, _ = _pipeline("flow_map", num_classes=2)
    with pytest.raises(ValueError, match="out of range"):
        conditional(1, class_labels=[0, 2])
    with pytest.raises(ValueError, match="2 class_labels for batch_size 3"):
        conditional(1, class_labels=[0, 1], batch_size=3)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["export", str(run_dir), "--diffusers", str(tmp_path / "taken")]) == 2
    assert "not an empty folder or an earlier export" in capsys.readouterr().err
