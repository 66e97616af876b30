"""An MLP backbone for vector data ``[B, D]`` (other shapes are flattened and restored)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from flowmaps.nets.embeddings import ClassEmbedding, FourierInputFeatures, FourierTimeEmbedding, refuse_labels
from flowmaps.nets.registry import BackboneOptions, register_backbone
from flowmaps.options import option


class SiLUWithTangent(torch.autograd.Function):
    """``(z, dz) -> (silu(z), silu'(z) dz)`` as one autograd node, with
    ``silu'(z) = sig (1 + z (1 - sig))`` and ``silu''(z) = sig (1 - sig) (2 + z (1 - 2 sig))``, ``sig = sigmoid(z)``.

    The backward maps ``(g, g_d)`` to ``(g silu'(z) + g_d dz silu''(z), g_d silu'(z))``; it is
    first-order only (``once_differentiable``: differentiating it again raises instead of silently
    treating the saved activations as constants). Every product with ``silu'`` is one call of silu's
    own backward kernel (``aten.silu_backward(g, z) = g silu'(z)``) and ``sig (1 - sig) p`` one call of
    sigmoid's, so the node saves only ``z`` and ``dz`` and runs 11 element-wise passes where separate
    autograd operations would run about 19: a few percent of a JVP-through-the-network step on CPU.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(z, dz)
        return torch.nn.functional.silu(z), torch.ops.aten.silu_backward(dz, z)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, grad_tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, dz = ctx.saved_tensors
        sig = torch.sigmoid(z)
        bend = torch.addcmul(z, z, sig, value=-2).add_(2)  # 2 + z (1 - 2 sig)
        curvature_term = torch.ops.aten.sigmoid_backward(bend.mul_(grad_tangent).mul_(dz), sig)
        grad_z = torch.ops.aten.silu_backward(grad, z).add_(curvature_term)
        return grad_z, torch.ops.aten.silu_backward(grad_tangent, z)


class MLP(nn.Module):
    """Average-velocity network ``V(x, s, t) = MLP([phi(x), e(s), e(t - s), c])``.

    The times enter as features of ``s`` and of the interval ``t - s`` (so the diagonal ``s = t`` is a
    clean, always-identical signal, as in MeanFlow's ``(t, t - r)`` conditioning); ``e`` is the raw
    time plus ``num_freqs`` Fourier features (0 by default: raw times train fastest on 2D data).
    ``phi`` is ``x`` plus ``x_features`` random Fourier features of scale ``x_scale``
    (``FourierInputFeatures``; 0 by default), for sharp low-dimensional targets.
    Smooth activations (SiLU) keep the network twice differentiable, which JVP-based losses need.
    No normalisation layers: with torch 2.13 the gradient of a forward-mode tangent through the native
    ``LayerNorm`` kernel is wrong (``docs/jvp.md``). ``num_classes > 0`` adds a learned class
    embedding with a null class (``ClassEmbedding``: ``cond`` a ``[B]`` integer tensor, ``-1`` or
    ``None`` for no label).

    ``forward_with_tangent`` returns ``V`` and its directional derivative along ``(dx, ds, dt)`` in
    closed form: the ``"fused"`` backend of ``flowmaps.jvp`` uses it, at about the cost of two
    forwards, and its gradient is ordinary reverse mode (no forward-mode kernels, nothing special
    under DDP).
    """

    def __init__(
        self,
        dim: int,
        width: int = 256,
        depth: int = 3,
        num_freqs: int = 0,
        max_freq: float = 8.0,
        num_classes: int = 0,
        class_dim: int = 16,
        x_features: int = 0,
        x_scale: float = 1.0,
    ):
        super().__init__()
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"MLP needs dim, width, depth >= 1; got dim={dim}, width={width}, depth={depth}")
        self.dim = dim
        self.embed = FourierTimeEmbedding(num_freqs, max_freq)
        self.x_embed = FourierInputFeatures(dim, x_features, x_scale)
        self.class_embed = ClassEmbedding(num_classes, class_dim) if num_classes > 0 else None
        layers: list[nn.Module] = []
        d_in = self.x_embed.dim + 2 * self.embed.dim + (class_dim if num_classes > 0 else 0)
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.SiLU()]
            d_in = width
        out = nn.Linear(width, dim)
        nn.init.normal_(out.weight, std=1.0 / math.sqrt(width))
        nn.init.zeros_(out.bias)
        self.layers = nn.Sequential(*layers, out)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != self.dim:
            raise ValueError(f"MLP was built for {self.dim} features; got x of shape {tuple(x.shape)}")
        return h

    def _class_features(self, cond: Optional[torch.Tensor], h: torch.Tensor) -> list[torch.Tensor]:
        if self.class_embed is None:
            refuse_labels(cond)
            return []
        return [self.class_embed(cond, h.shape[0], h.device).to(h.dtype)]

    def forward(
        self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        h = self._flat(x)
        features = [self.x_embed(h), self.embed(s), self.embed(t - s), *self._class_features(cond, h)]
        return self.layers(torch.cat(features, dim=-1)).reshape(x.shape)

    @property
    def has_fused_tangent(self) -> bool:
        """``forward_with_tangent`` knows the layers built here (linear, SiLU); a network whose layers
        were changed afterwards (say, dropout inserted) must use another JVP backend."""
        return all(isinstance(layer, (nn.Linear, nn.SiLU)) for layer in self.layers)

    def forward_with_tangent(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor],
        dx: torch.Tensor,
        ds: torch.Tensor,
        dt: torch.Tensor,
        tangent_grad: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V(x, s, t), d/de V(x + e dx, s + e ds, t + e dt) at e = 0)``.

        Chain rule layer by layer: a linear layer maps ``(h, dh)`` to ``(W h + b, W dh)``, SiLU maps
        ``(z, dz)`` to ``(z sig(z), dz silu'(z))`` with ``silu'(z) = sig(z) (1 + z (1 - sig(z)))``.
        With ``tangent_grad`` primal and tangent both carry gradients (SiLU's pair through
        ``SiLUWithTangent``, one fused autograd node). Without it the tangent is computed under
        ``torch.no_grad`` from the detached primal activations (a stop-gradient tangent) while the
        primal is an ordinary gradient-carrying forward: one pass for both, about the cost of two
        forwards and one backward.
        """
        if not self.has_fused_tangent:
            raise ValueError("MLP.forward_with_tangent knows only the linear and SiLU layers it builds; this MLP's "
                             f"layers are {[type(m).__name__ for m in self.layers]}: use another JVP backend")
        h, dh = self._flat(x), self._flat(dx)
        classes = self._class_features(cond, h)
        features = torch.cat([self.x_embed(h), self.embed(s), self.embed(t - s), *classes], dim=-1)
        with torch.set_grad_enabled(tangent_grad and torch.is_grad_enabled()):
            d_features = torch.cat(
                [self.x_embed.tangent(h, dh), self.embed.tangent(s, ds), self.embed.tangent(t - s, dt - ds),
                 *[torch.zeros_like(c) for c in classes]], dim=-1)
        if tangent_grad:
            primal, tangent = self._joint_tangent(features, d_features)
        else:
            primal, tangent = self._detached_tangent(features, d_features)
        return primal.reshape(x.shape), tangent.reshape(x.shape)

    def _joint_tangent(self, primal: torch.Tensor, tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                primal, tangent = layer(primal), tangent @ layer.weight.T
            else:  # SiLU, the only other layer
                primal, tangent = SiLUWithTangent.apply(primal, tangent)
        return primal, tangent

    def _detached_tangent(self, primal: torch.Tensor, tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                with torch.no_grad():
                    tangent = tangent @ layer.weight.T
                primal = layer(primal)
            else:  # SiLU, the only other layer
                with torch.no_grad():
                    # dz silu'(z) in one kernel: silu's own backward applied to the tangent
                    tangent = torch.ops.aten.silu_backward(tangent, primal)
                primal = layer(primal)
        return primal, tangent


# x_features=None: random Fourier features for low-dimensional samples alone (the 2-D sets), where sharp
# edges need them (LSD's MLP default; docs/benchmarks.md, "The default experiment")
LOW_DIM = 4
AUTO_X_FEATURES = 128


@dataclass
class MLPOptions(BackboneOptions):
    """Options of the ``mlp`` backbone (``MLP``)."""

    tiny: ClassVar[dict[str, Any]] = {"width": 16, "depth": 2}
    width: int = option(256, "hidden width", within="[1, inf)")
    depth: int = option(3, "hidden layers", within="[1, inf)")
    num_freqs: int = option(0, "Fourier features of each time (0: the raw time alone)", within="[0, inf)")
    max_freq: float = option(8.0, "highest time frequency", within="(0, inf)")
    x_features: Optional[int] = option(0, "random Fourier features of x (Tancik et al. 2020; 0: x alone; None: "
                                       f"{AUTO_X_FEATURES} for samples of at most {LOW_DIM} values, else 0)",
                                       within="[0, inf)")
    x_scale: float = option(0.5, "scale of the random Fourier features of x", within="(0, inf)")
    class_dim: int = option(16, "width of the class embedding (model.num_classes > 0)", within="[1, inf)")

    legacy: ClassVar[dict[str, Any]] = {"x_scale": 1.0}

    def resolved(self, shape: tuple[int, ...]) -> "MLPOptions":
        if self.x_features is not None:
            return self
        return dataclasses.replace(self, x_features=AUTO_X_FEATURES if math.prod(shape) <= LOW_DIM else 0)


@register_backbone("mlp", MLPOptions)
def build_mlp(options: MLPOptions, shape: tuple[int, ...], num_classes: int) -> MLP:
    """An MLP on the flattened sample, times as raw values (plus optional Fourier features)."""
    return MLP(math.prod(shape), width=options.width, depth=options.depth, num_freqs=options.num_freqs,
               max_freq=options.max_freq, num_classes=num_classes, class_dim=options.class_dim,
               x_features=options.x_features, x_scale=options.x_scale)
