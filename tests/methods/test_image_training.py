"""Every registered method trains every image backbone with class labels, driven by both registries.

For each method and each backbone whose test shape is an image ``[C, H, W]``: one training step of a
tiny class-conditional network on a labelled Gaussian mixture of that shape (the exact conditional
velocity as the teacher, spec §7) gives a finite loss, and every trainable parameter a finite,
non-zero gradient. The parameters are jittered first, so that zero-initialised output layers
(adaLN-Zero, zero convolutions) do not hide a parameter the loss cannot reach.
"""

import copy
import math

import pytest
import torch

from flowmaps.flow_map import FlowMap
from flowmaps.methods import Batch, LossContext, build_method, get_method_class, method_names
from flowmaps.nets import NULL_CLASS, backbone_entry, backbone_names, build_backbone
from flowmaps.oracle import GaussianMixture
from flowmaps.teachers import ExactTeacher, FlowMapTeacher
from flowmaps.train.config import ModelConfig

CLASSES = 3
IMAGE_BACKBONES = [n for n in backbone_names() if len(backbone_entry(n).options.test_shape) == 3]


def labelled_mixture(shape: tuple[int, ...]) -> GaussianMixture:
    """One component per class, means apart along random directions, over the flattened image."""
    g = torch.Generator().manual_seed(0)
    dim = math.prod(shape)
    means = torch.randn(CLASSES, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.full((CLASSES,), 1 / CLASSES), means, torch.full((CLASSES, dim), 0.3),
                           labels=torch.arange(CLASSES))


def tiny_model(backbone: str) -> FlowMap:
    entry = backbone_entry(backbone)
    shape = entry.options.test_shape
    torch.manual_seed(0)
    net = build_backbone(ModelConfig(backbone, CLASSES, dict(entry.options.tiny)), shape)
    model = FlowMap(net, shape=shape, num_classes=CLASSES).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("backbone", IMAGE_BACKBONES)
@pytest.mark.parametrize("name", method_names())
def test_one_labelled_image_step_reaches_every_parameter(name, backbone):
    model = tiny_model(backbone)
    shape = model.shape
    mixture = labelled_mixture(shape)
    cls = get_method_class(name)
    teacher = None
    if cls.needs_teacher:
        teacher = FlowMapTeacher(copy.deepcopy(model)) if cls.initializes_from_teacher else ExactTeacher(mixture)
    method = build_method(name, mixture.schedule, teacher=teacher)
    method.initialize(model)
    networks = {k: a.module.double() for k, a in method.auxiliary_networks(shape, CLASSES).items()}
    g = torch.Generator().manual_seed(1)
    x0, labels = mixture.sample(16, g, return_labels=True)
    labels = labels.clone()
    labels[0] = NULL_CLASS  # a dropped label, as classifier-free training makes them
    out = method.loss(model, Batch(x0.reshape(16, *shape).double(), labels), torch.Generator().manual_seed(2),
                      LossContext(9, 10, None, networks))
    assert torch.isfinite(out.loss) and out.terms, (name, out)
    (out.loss if out.auxiliary_loss is None else out.loss + out.auxiliary_loss).backward()
    for module in (model, *networks.values()):
        for pname, p in module.named_parameters():
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), (name, backbone, pname)
    silent = [pname for pname, p in model.named_parameters() if not float(p.grad.abs().sum()) > 0]
    assert not silent, (name, backbone, silent)
