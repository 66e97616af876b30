"""Every building block of ``flowmaps.nets.layers`` (and the native layers the image backbones use) has an
exact forward-mode tangent and an exact parameter gradient *through* that tangent (reverse-over-
forward), under ``torch.func.jvp`` and ``torch.autograd.forward_ad``, against float64 central
differences. Each layer sits between a parametrised layer before it and a nonlinearity after it:
a wrong gradient through the tangent shows up in the parameters *before* a layer (native LayerNorm's
failure does), and second derivatives matter only behind a nonlinearity. The last tests pin the
torch 2.13 failures that ``docs/jvp.md`` records."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from flowmaps.nets import layers

D = torch.float64
BACKENDS = ["func", "forward_ad"]


class Lambda(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Modulated(nn.Module):
    """``modulate(h, scale(c), shift(c))`` with ``c`` the first feature of each row (a condition)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale, self.shift = nn.Linear(1, dim), nn.Linear(1, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        c = h[..., :1]
        return layers.modulate(h, self.scale(c), self.shift(c))


def image(channels: int, layer: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """``silu(layer(conv1x1(x)))`` on ``[2, 2, 4, 4]`` images."""
    return nn.Sequential(nn.Conv2d(2, channels, 1), layer, nn.SiLU()), torch.randn(2, 2, 4, 4)


def tokens(dim: int, layer: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """``silu(layer(linear(x)))`` on ``[2, 5, 3]`` tokens."""
    return nn.Sequential(nn.Linear(3, dim), layer, nn.SiLU()), torch.randn(2, 5, 3)


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "group_norm": lambda: image(8, layers.GroupNorm(8, groups=2)),
    "layer_norm": lambda: tokens(8, layers.LayerNorm(8)),
    "layer_norm_affine": lambda: tokens(8, layers.LayerNorm(8, affine=True)),
    "attention": lambda: tokens(8, layers.SelfAttention(8, heads=2, zero_out=False)),
    "attention_head_dim": lambda: tokens(8, layers.SelfAttention(8, heads=2, head_dim=3, zero_out=False)),
    "conv": lambda: image(4, nn.Conv2d(4, 3, 3, padding=1)),
    "linear": lambda: tokens(6, nn.Linear(6, 4)),
    "silu": lambda: tokens(6, nn.SiLU()),
    "gelu": lambda: tokens(6, nn.GELU(approximate="tanh")),
    "downsample": lambda: image(3, Lambda(layers.downsample)),
    "upsample": lambda: image(3, Lambda(layers.upsample)),
    "modulate": lambda: tokens(6, Modulated(6)),
    "time_embedding": lambda: (nn.Sequential(layers.TimeEmbedding(8, num_freqs=3, max_freq=4.0), nn.SiLU()),
                               torch.rand(5)),
    "dropout": lambda: tokens(6, nn.Dropout(0.4)),
}


def tangent(module: nn.Module, x: torch.Tensor, dx: torch.Tensor, backend: str) -> torch.Tensor:
    """The tangent of ``module`` at ``x`` along ``dx``; the random state is reset first, so every
    evaluation draws the same dropout mask."""
    torch.manual_seed(123)
    if backend == "func":
        return torch.func.jvp(module, (x,), (dx,))[1]
    with fwAD.dual_level():
        return fwAD.unpack_dual(module(fwAD.make_dual(x, dx))).tangent


def check_tangent_and_its_gradient(module: nn.Module, x: torch.Tensor, backend: str) -> None:
    g = torch.Generator().manual_seed(1)
    dx = torch.randn(x.shape, generator=g, dtype=D)
    d = tangent(module, x, dx, backend)
    h = 1e-6
    with torch.no_grad():
        torch.manual_seed(123)
        plus = module(x + h * dx)
        torch.manual_seed(123)
        fd = (plus - module(x - h * dx)) / (2 * h)
    assert torch.allclose(d, fd, atol=1e-7, rtol=1e-6), float((d - fd).abs().max())

    weights = torch.randn(d.shape, generator=g, dtype=D)
    (d * weights).sum().backward()
    params = [p for p in module.parameters()]
    directions = [torch.randn(p.shape, generator=g, dtype=D) for p in params]
    analytic = sum(float((p.grad * u).sum()) for p, u in zip(params, directions) if p.grad is not None)

    def weighted_tangent(delta: float) -> float:
        with torch.no_grad():
            for p, u in zip(params, directions):
                p.add_(delta * u)
            value = float((tangent(module, x, dx, backend) * weights).sum())
            for p, u in zip(params, directions):
                p.sub_(delta * u)
        return value

    numeric = (weighted_tangent(1e-5) - weighted_tangent(-1e-5)) / 2e-5
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_tangent_and_its_parameter_gradient_match_finite_differences(case, backend):
    torch.manual_seed(0)
    module, x = CASES[case]()
    module = module.to(D).train()
    check_tangent_and_its_gradient(module, x.to(D), backend)


def test_norm_groups_divide_the_channels_with_at_least_four_channels_each():
    assert [layers.norm_groups(c) for c in (1, 4, 8, 12, 16, 24, 48, 64, 128, 256)] == [1, 1, 2, 3, 4, 6, 12, 16,
                                                                                          32, 32]
    with pytest.raises(ValueError, match="3 groups do not divide 8"):
        layers.GroupNorm(8, groups=3)
    with pytest.raises(ValueError, match="heads"):
        layers.SelfAttention(6, heads=4)


def test_normalisations_attention_and_time_features_compute_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = layers.TimeEmbedding(8)(torch.rand(3))
        normed = layers.LayerNorm(8)(x.bfloat16())
        grouped = layers.GroupNorm(4)(x.bfloat16()[..., None])
    assert emb.dtype == torch.float32
    assert normed.dtype == grouped.dtype == torch.bfloat16  # the input's dtype back, computed in float32
    assert torch.allclose(normed.float(), layers.LayerNorm(8)(x), atol=2e-2)
    q = torch.randn(2, 3, 5, 4)
    assert torch.allclose(layers.attention(q, q, q), F.scaled_dot_product_attention(q, q, q), atol=1e-6)


# torch 2.13 failures that docs/jvp.md records; when torch fixes one, its test fails: update the doc
# (and consider the native kernel in layers.py).

def test_native_layer_norm_still_gives_a_wrong_gradient_through_the_tangent():
    torch.manual_seed(0)
    module, x = tokens(8, nn.LayerNorm(8))
    with pytest.raises(AssertionError):
        check_tangent_and_its_gradient(module.to(D), x.to(D), "func")


def test_softmax_under_forward_ad_still_cannot_be_differentiated_through_its_tangent():
    z = torch.randn(3, 5, dtype=D, requires_grad=True)
    with fwAD.dual_level():
        d = fwAD.unpack_dual(torch.softmax(fwAD.make_dual(z, torch.randn_like(z)), dim=-1)).tangent
    with pytest.raises(RuntimeError, match="inplace"):
        d.square().sum().backward()


def test_default_cpu_attention_kernel_still_has_no_forward_mode_rule():
    q = torch.randn(2, 3, 5, 4)
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(F.scaled_dot_product_attention, (q, q, q), (q, q, q))


def test_attention_benchmark_prints_its_table(capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "attention_jvp.py"
    spec = importlib.util.spec_from_file_location("attention_jvp", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--batch", "2", "--tokens", "4", "--heads", "2", "--head-dim", "4", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| hand, elementary")]
    assert rows and rows[0].split("|")[2].strip() == "yes" and rows[0].split("|")[3].strip() == "yes"
