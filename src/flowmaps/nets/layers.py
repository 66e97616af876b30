"""Building blocks for image backbones whose forward-mode JVPs, and the gradients of those JVPs, are exact.

Flow-map losses take ``jvp(V, (x, s, t), (dx, ds, dt))`` through the whole network and often
back-propagate through the tangent (reverse-over-forward). Every layer here was checked against
float64 central differences for both (``tests/nets/test_layers.py``, backends ``torch.func.jvp``
and ``torch.autograd.forward_ad``); what failed with torch 2.13 and the replacement used:

- ``nn.LayerNorm`` / ``F.layer_norm``: the tangent is right but its parameter gradient is not (the
  kernel's saved mean and ``rstd`` carry no gradient). ``LayerNorm`` here is written with elementary
  ops: ``(h - mean) * rsqrt(mean((h - mean)^2) + eps)``.
- ``F.softmax`` / ``F.log_softmax`` under ``forward_ad``: back-propagating through the tangent fails
  (an in-place update of a tensor saved for the backward); ``F.scaled_dot_product_attention``'s
  default CPU kernel has no forward-mode rule at all, and its math backend contains that softmax.
  ``attention`` is ``softmax(q k^T / sqrt(d)) v`` with an elementary softmax
  (``exp(z - max z) / sum exp(z - max z)``, the maximum a constant: softmax does not depend on it).

Native kernels that pass and are used as they are: ``F.group_norm`` (its saved statistics do carry
gradients), ``nn.Conv2d``, ``nn.Linear``, SiLU, GELU, ``F.avg_pool2d``, nearest up-sampling and
dropout (a single pass under ``func`` / ``forward_ad``; the ``finite_difference`` backend replays
the random-number state, so its three evaluations draw the same mask). ``docs/jvp.md`` has the
numbers. Normalisations and the softmax compute in at least float32 under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowmaps.nets.embeddings import ClassEmbedding, FourierTimeEmbedding, refuse_labels


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32 (float64 stays float64): the precision of normalisations and softmaxes."""
    return torch.promote_types(x.dtype, torch.float32)


def norm_groups(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """Groups of ``GroupNorm`` for ``channels``: at most ``max_groups``, at least ``min_per_group``
    channels each, dividing ``channels`` (EDM's rule, Karras et al. 2022, made to divide)."""
    groups = max(1, min(max_groups, channels // min_per_group))
    while channels % groups:
        groups -= 1
    return groups


class GroupNorm(nn.Module):
    """``GroupNorm`` with affine parameters over ``[B, C, ...]`` (Wu & He 2018), native kernel in float32."""

    def __init__(self, channels: int, groups: int = 0, eps: float = 1e-5):
        super().__init__()
        self.groups = groups or norm_groups(channels)
        if channels % self.groups:
            raise ValueError(f"GroupNorm: {self.groups} groups do not divide {channels} channels")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        out = F.group_norm(x.to(dtype), self.groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return out.to(x.dtype)


class LayerNorm(nn.Module):
    """``(h - mean) / sqrt(var + eps)`` over the last dimension, in elementary ops (exact tangent gradients,
    unlike the native kernel); ``affine`` adds ``weight`` and ``bias`` (DiT's blocks use none)."""

    def __init__(self, dim: int, affine: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(compute_dtype(x))
        centred = h - h.mean(dim=-1, keepdim=True)
        out = centred * torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight.to(out.dtype) + self.bias.to(out.dtype)
        return out.to(x.dtype)


def softmax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(z - m) / sum exp(z - m)`` with ``m = max z`` held constant (the result does not depend on it)."""
    e = torch.exp(z - z.detach().amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for ``[..., N, d]`` queries, keys and values (Vaswani et al. 2017);
    the scores and their softmax in at least float32."""
    scores = (q @ k.transpose(-2, -1)).to(compute_dtype(q)) * (q.shape[-1] ** -0.5)
    return softmax(scores).to(v.dtype) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens ``[B, N, dim]``: ``heads`` heads of ``head_dim`` features
    (0: ``dim // heads``); the output projection starts at zero when ``zero_out`` (a residual branch
    that starts as the identity, as in ADM)."""

    def __init__(self, dim: int, heads: int, head_dim: int = 0, zero_out: bool = True):
        super().__init__()
        if heads < 1 or (head_dim == 0 and dim % heads):
            raise ValueError(f"SelfAttention: {heads} heads do not divide {dim} features (set head_dim)")
        self.heads = heads
        inner = heads * (head_dim or dim // heads)
        self.qkv = nn.Linear(dim, 3 * inner)
        self.out = nn.Linear(inner, dim)
        if zero_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(attention(q, k, v).transpose(1, 2).reshape(batch, tokens, -1))


def downsample(x: torch.Tensor) -> torch.Tensor:
    """Halve the resolution of ``[B, C, H, W]`` (2 x 2 average pooling; H and W even)."""
    return F.avg_pool2d(x, 2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Double the resolution of ``[B, C, H, W]`` (nearest neighbour)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def modulate(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """FiLM / adaLN: ``h (1 + scale) + shift`` (Perez et al. 2018; ADM's scale-shift norm)."""
    return torch.addcmul(shift, h, 1 + scale)


class TimeEmbedding(nn.Module):
    """``MLP(phi(t))``: ``phi`` the sinusoidal features ``[t, sin(2 pi f_k t), cos(2 pi f_k t)]`` with
    ``num_freqs`` frequencies ``f_k`` log-spaced in ``[1, max_freq]`` (``FourierTimeEmbedding``), then
    Linear-SiLU-Linear to ``dim`` (the ADM / DiT time embedding; Dhariwal & Nichol 2021, Peebles & Xie 2023).

    The features and the MLP run in float32 (or float64 for a float64 network) even under autocast: a
    bf16 sine of a time loses the time's low digits, and the JVP's time tangent goes through here.
    Moderate frequencies keep ``d/dt`` of the embedding, so the tangents, small (``FourierTimeEmbedding``).
    """

    def __init__(self, dim: int, num_freqs: int = 16, max_freq: float = 8.0):
        super().__init__()
        self.features = FourierTimeEmbedding(num_freqs, max_freq)
        self.mlp = nn.Sequential(nn.Linear(self.features.dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            features = self.features(t.to(compute_dtype(t)))
            return self.mlp(features.to(self.mlp[0].weight.dtype))


class ConditionEmbedding(nn.Module):
    """``E_s(s) + E_d(t - s) + E_c(cond)``: separate time embeddings of the source time and of the
    interval (the post's recommendation; MeanFlow's ``(t, t - r)``), plus the class embedding with its
    null class when ``num_classes > 0`` (an unconditional network refuses labels). Float32 (or float64)
    even under autocast, as ``TimeEmbedding`` is. The vector that drives every block's scale and shift
    (U-Net) or adaLN-Zero (DiT)."""

    def __init__(self, dim: int, num_classes: int = 0, num_freqs: int = 16, max_freq: float = 8.0):
        super().__init__()
        self.embed_s = TimeEmbedding(dim, num_freqs, max_freq)
        self.embed_interval = TimeEmbedding(dim, num_freqs, max_freq)
        self.class_embed = ClassEmbedding(num_classes, dim) if num_classes > 0 else None

    def forward(self, s: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        emb = self.embed_s(s) + self.embed_interval(t - s)
        if self.class_embed is None:
            refuse_labels(cond)
            return emb
        return emb + self.class_embed(cond, s.shape[0], s.device).to(emb.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    """``module`` with its weights and biases set to zero (a branch that starts switched off)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


__all__ = ["GroupNorm", "LayerNorm", "SelfAttention", "TimeEmbedding", "attention", "compute_dtype", "downsample",
           "modulate", "norm_groups", "softmax", "upsample", "zero_init"]
