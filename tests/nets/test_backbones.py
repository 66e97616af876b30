"""Every registered backbone (``model.backbone``), driven by the registry: each is built from its options'
``tiny`` values for samples of its options' ``test_shape`` (vectors ``(3,)`` when it declares none),
unconditional and, unless its builder refuses classes (an unconditional-only backbone such as the
example of ``docs/extending.md``), with 3 classes. Shapes, ``F(x, t, t) = x``, forward-mode
tangents and their parameter gradients against finite differences through each JVP backend, labels
and the null class, input and option errors; then the image backbones' shape-adaptive defaults and
autocast."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.jvp import flow_jvp
from flowmaps.nets import backbone_entry, backbone_names, build_backbone
from flowmaps.nets.layers import TimeEmbedding
from flowmaps.train.config import ModelConfig

BACKENDS = ["func", "forward_ad", "auto"]
IMAGE_BACKBONES = ["unet", "dit"]
LABELLED_BACKBONES = ["mlp", "unet", "dit"]  # the built-in ones all take class labels
D = torch.float64


def sample_shape(name: str) -> tuple[int, ...]:
    return tuple(getattr(backbone_entry(name).options, "test_shape", (3,)))


def small(name: str, num_classes: int = 0, **options) -> FlowMap:
    """The backbone's tiny instance in float64, its zero-initialised parameters (output layers, adaLN-Zero
    gates) made random so that no check passes for want of a signal."""
    torch.manual_seed(0)
    config = ModelConfig(backbone=name, num_classes=num_classes,
                         options={**backbone_entry(name).options.tiny, **options})
    model = FlowMap(build_backbone(config, sample_shape(name))).double()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model


def takes_labels(name: str) -> bool:
    """Whether the backbone builds with classes (a builder that refuses them raises a ``ValueError``)."""
    try:
        small(name, num_classes=3)
    except ValueError:
        return False
    return True


def conditional(name: str) -> FlowMap:
    """The tiny instance with 3 classes; the test is skipped for an unconditional-only backbone."""
    try:
        return small(name, num_classes=3)
    except ValueError:
        pytest.skip(f"backbone {name!r} is unconditional only")


def inputs(name: str, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *sample_shape(name), generator=g, dtype=D)
    s, t = torch.rand(batch, generator=g, dtype=D), torch.rand(batch, generator=g, dtype=D)
    return x, s, t, g


def labels(num_classes: int, batch: int = 4):
    return torch.tensor([0, 2, -1, 1][:batch]) if num_classes else None


@pytest.mark.parametrize("name", backbone_names())
def test_the_backbone_predicts_a_velocity_shaped_like_the_data(name):
    for num_classes in (0, 3) if takes_labels(name) else (0,):
        model = small(name, num_classes)
        x, s, t, _ = inputs(name, batch=3)
        cond = labels(num_classes, 3)
        assert model(x, s, t, cond, output="V").shape == x.shape
        assert torch.allclose(model(x, t, t, cond), x)  # F(x, t, t) = x by construction


def check_tangents(model: FlowMap, name: str, backend: str, num_classes: int) -> None:
    """The tangent of ``V`` along ``(dx, 1, 0.5)`` and the gradient of ``sum(w * tangent)`` along a random
    direction of all parameters, against central differences."""
    x, s, t, g = inputs(name)
    cond = labels(num_classes)
    dx = torch.randn(x.shape, generator=g, dtype=D)
    h = 1e-6
    _, tangent = flow_jvp(model, x, s, t, cond, dx=dx, ds=1.0, dt=0.5, output="V", backend=backend, grad="full")
    with torch.no_grad():
        fd = (model(x + h * dx, s + h, t + 0.5 * h, cond, output="V", check_times=False)
              - model(x - h * dx, s - h, t - 0.5 * h, cond, output="V", check_times=False)) / (2 * h)
    assert torch.allclose(tangent, fd, atol=1e-6, rtol=1e-5), float((tangent - fd).abs().max())
    weights = torch.randn(tangent.shape, generator=g, dtype=D)
    (tangent * weights).sum().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    directions = [torch.randn(p.shape, generator=g, dtype=D) for p in params]
    analytic = sum(float((p.grad * u).sum()) for p, u in zip(params, directions))

    def tangent_sum(delta: float) -> float:
        with torch.no_grad():
            for p, u in zip(params, directions):
                p.add_(delta * u)
            value = flow_jvp(model, x, s, t, cond, dx=dx, ds=1.0, dt=0.5, output="V", backend="func", grad="none")[1]
            for p, u in zip(params, directions):
                p.sub_(delta * u)
        return float((value * weights).sum())

    numeric = (tangent_sum(1e-5) - tangent_sum(-1e-5)) / 2e-5
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", backbone_names())
def test_tangents_and_their_gradients_match_finite_differences(name, backend):
    check_tangents(small(name), name, backend, num_classes=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", backbone_names())
def test_conditional_tangents_and_their_gradients_match_finite_differences(name, backend):
    check_tangents(conditional(name), name, backend, num_classes=3)


def test_the_built_in_backbones_take_class_labels():
    assert all(takes_labels(name) for name in LABELLED_BACKBONES)


@pytest.mark.parametrize("name", backbone_names())
def test_labels_to_an_unconditional_model_and_inputs_of_the_wrong_shape_are_refused(name):
    x, s, t, _ = inputs(name)
    model = small(name)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, s, t, torch.zeros(4, dtype=torch.long))
    shape = sample_shape(name)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(4, *shape[:-1], shape[-1] + 1, dtype=D), s, t)


@pytest.mark.parametrize("name", backbone_names())
def test_labels_out_of_range_are_refused_and_the_null_class_is_the_unconditional_model(name):
    """In eval mode the bare backbone checks the labels' range; in training mode (no per-call device
    synchronisation) ``FlowMap`` checks them at the user-facing call."""
    model = conditional(name).eval()
    x, s, t, _ = inputs(name)
    with pytest.raises(ValueError, match="out of range"):
        model(x, s, t, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="out of range"):
        FlowMap(conditional(name).train(), num_classes=3)(x, s, t, torch.tensor([0, 1, 3, 0]))
    null = torch.full((4,), -1)
    assert torch.allclose(model(x, s, t, None), model(x, s, t, null))
    mixed = torch.tensor([-1, 0, -1, 2])
    assert torch.allclose(model(x, s, t, mixed)[[0, 2]], model(x, s, t, None)[[0, 2]])
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    assert not torch.allclose(model(x, s, t, zeros), model(x, s, t, ones))


@pytest.mark.parametrize("name", backbone_names())
def test_dropout_masks_agree_between_forward_mode_and_finite_differences(name):
    """In train mode, ``finite_difference`` replays the random state: its three evaluations draw the
    same masks as the single pass of ``func`` from the same state."""
    if "dropout" not in {f.name for f in dataclasses.fields(backbone_entry(name).options)}:
        pytest.skip(f"backbone {name!r} has no dropout option")
    model = small(name, dropout=0.5).train()
    x, s, t, g = inputs(name)
    dx = torch.randn(x.shape, generator=g, dtype=D)
    tangents = []
    for backend in ("func", "finite_difference"):
        torch.manual_seed(7)
        tangents.append(flow_jvp(model, x, s, t, dx=dx, ds=1.0, output="V", backend=backend, grad="none")[1])
    assert torch.allclose(*tangents, atol=1e-6, rtol=1e-5)
    torch.manual_seed(8)
    other = flow_jvp(model, x, s, t, dx=dx, ds=1.0, output="V", backend="func", grad="none")[1]
    assert not torch.allclose(tangents[0], other)  # dropout is on: another state, other masks


@pytest.mark.parametrize("name", backbone_names())
def test_unknown_or_bad_options_are_named(name):
    with pytest.raises(ValueError, match="no_such_option"):
        build_backbone(ModelConfig(backbone=name, options={"no_such_option": 1}), sample_shape(name))


def test_unet_and_dit_options_that_do_not_fit_the_image_are_named():
    cases = [
        ("unet", {"chanels": 8}, (1, 8, 8), "chanels"),
        ("unet", {"channels": -1}, (1, 8, 8), "channels"),
        ("unet", {"channel_mult": [1, 0]}, (1, 8, 8), "channel_mult"),
        ("unet", {"channel_mult": [1, 2, 2, 2]}, (1, 28, 28), r"channel_mult.*\(1, 28, 28\)"),
        ("unet", {"attention_resolutions": [5]}, (1, 28, 28), r"attention_resolutions.*\(1, 28, 28\)"),
        ("unet", {"heads": 3}, (1, 28, 28), "heads"),
        ("unet", {}, (3,), r"takes images.*\(3,\)"),
        ("dit", {"patch_size": 3}, (1, 28, 28), r"patch_size.*\(1, 28, 28\)"),
        ("dit", {"width": 30}, (1, 8, 8), "width"),
        ("dit", {"dropout": 1.0}, (1, 8, 8), "dropout"),
        ("dit", {}, (2, 8), "takes images"),
    ]
    for name, options, shape, message in cases:
        with pytest.raises(ValueError, match=message):
            build_backbone(ModelConfig(backbone=name, options=options), shape)


@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 8, 12)])
@pytest.mark.parametrize("name", IMAGE_BACKBONES)
def test_image_backbones_adapt_their_defaults_to_the_image(name, shape):
    torch.manual_seed(0)
    model = FlowMap(build_backbone(ModelConfig(backbone=name, num_classes=2), shape))
    x = torch.randn(2, *shape)
    with torch.no_grad():
        v = model(x, torch.rand(2), torch.rand(2), torch.tensor([1, -1]), output="V")
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("name", backbone_names())
def test_bf16_autocast_runs_and_keeps_the_time_embeddings_in_float32(name):
    num_classes = 3 if takes_labels(name) else 0
    torch.manual_seed(0)
    model = FlowMap(build_backbone(ModelConfig(backbone=name, num_classes=num_classes,
                                               options=backbone_entry(name).options.tiny), sample_shape(name)))
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, TimeEmbedding):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x = torch.randn(2, *sample_shape(name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(x, torch.rand(2), torch.rand(2), torch.tensor([0, -1]) if num_classes else None, output="V")
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert all(dtype == torch.float32 for dtype in seen)
    if name in IMAGE_BACKBONES:
        assert len(seen) == 2  # E_s(s) and E_d(t - s)
