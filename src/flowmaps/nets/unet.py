"""The ``unet`` backbone: an ADM / EDM-style U-Net for images ``[B, C, H, W]``.

``V(x, s, t, c) = UNet(x; e)`` with one embedding ``e = E_s(s) + E_d(t - s) + E_c(c)`` of the source
time, the interval and the class (separate time embeddings, as MeanFlow's ``(t, t - r)``: the
diagonal ``s = t`` is always the same signal ``E_d(0)``). ``e`` drives a scale and shift in every
residual block (ADM's scale-shift norm, Dhariwal & Nichol 2021):

    h = conv3x3(silu(GroupNorm(x)))
    h = conv3x3(dropout(silu(GroupNorm(h) * (1 + scale(e)) + shift(e))))
    out = skip(x) + h                          (skip: 1x1 conv when the channels change)

Encoder levels halve the resolution (average pooling), decoder levels double it (nearest) and
take the encoder's activations as skip connections (Ronneberger et al. 2015; Ho et al. 2020); the
chosen resolutions add self-attention after their blocks, and the lowest level's middle block too
when it has attention. The last conv of every block and the output conv start at zero (so
``V = 0`` at initialisation and each block starts as its skip path, as in ADM and EDM, Karras et
al. 2022). Every layer is a JVP-correct formulation (``flowmaps.nets.layers``).

Defaults adapt to the image so that small images train on a CPU: ``UNetOptions`` lists the rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from flowmaps.nets.layers import ConditionEmbedding, GroupNorm, SelfAttention, downsample, modulate, upsample, zero_init
from flowmaps.nets.registry import BackboneOptions, register_backbone
from flowmaps.options import option, require


class ResBlock(nn.Module):
    """``skip(x) + conv(dropout(silu(modulate(norm(conv(silu(norm(x)))), e)))))`` (module docstring)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = GroupNorm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.dropout(F.silu(modulate(self.norm2(h), scale, shift))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """``x + attention(GroupNorm(x))`` over the ``H * W`` pixels as tokens (starts as the identity)."""

    def __init__(self, channels: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = GroupNorm(channels)
        self.attn = SelfAttention(channels, heads, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


class Stage(nn.Module):
    """A residual block, followed by self-attention at the resolutions that have it."""

    def __init__(self, block: ResBlock, attention: Optional[AttentionBlock]):
        super().__init__()
        self.block = block
        self.attention = attention

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block(x, emb)
        return h if self.attention is None else self.attention(h)


class Resample(nn.Module):
    """Halve (``down``) or double the resolution; no parameters."""

    def __init__(self, down: bool):
        super().__init__()
        self.down = down

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return downsample(x) if self.down else upsample(x)


class UNet(nn.Module):
    """The U-Net of the module docstring for images of shape ``shape = (C, H, W)``: ``channels * m`` channels
    at each level (``channel_mult``), ``num_blocks`` residual blocks per level in the encoder and one
    more in the decoder, self-attention at ``attention_resolutions`` (a level's resolution is its
    smaller side), time features of ``num_freqs`` frequencies up to ``max_freq`` and an embedding of
    ``4 * channels``. ``num_classes > 0`` adds a class embedding with a null class (``cond`` -1 or
    ``None``)."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        channels: int,
        channel_mult: tuple[int, ...],
        num_blocks: int,
        attention_resolutions: tuple[int, ...] = (),
        heads: int = 4,
        head_dim: int = 0,
        dropout: float = 0.0,
        num_classes: int = 0,
        num_freqs: int = 16,
        max_freq: float = 8.0,
    ):
        super().__init__()
        self.shape = tuple(shape)
        emb_dim = 4 * channels
        self.embedding = ConditionEmbedding(emb_dim, num_classes, num_freqs, max_freq)

        def stage(cin: int, cout: int, resolution: int) -> Stage:
            attention = AttentionBlock(cout, heads, head_dim) if resolution in attention_resolutions else None
            return Stage(ResBlock(cin, cout, emb_dim, dropout), attention)

        ch, resolution = channels, min(shape[1:])
        self.input = nn.Conv2d(shape[0], ch, 3, padding=1)
        skip_channels = [ch]
        self.encoder = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.encoder.append(stage(ch, channels * mult, resolution))
                ch = channels * mult
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.encoder.append(Resample(down=True))
                skip_channels.append(ch)
                resolution //= 2
        self.middle = nn.ModuleList([stage(ch, ch, resolution), Stage(ResBlock(ch, ch, emb_dim, dropout), None)])
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                self.decoder.append(stage(ch + skip_channels.pop(), channels * mult, resolution))
                ch = channels * mult
            if level > 0:
                self.decoder.append(Resample(down=False))
                resolution *= 2
        self.out_norm = GroupNorm(ch)
        self.out = zero_init(nn.Conv2d(ch, shape[0], 3, padding=1))

    def forward(
        self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"this unet was built for images of shape (C, H, W) = {self.shape}; got x of shape "
                             f"{tuple(x.shape)}")
        emb = F.silu(self.embedding(s, t, cond))
        h = self.input(x)
        skips = [h]
        for module in self.encoder:
            h = module(h, emb)
            skips.append(h)
        for module in self.middle:
            h = module(h, emb)
        for module in self.decoder:
            h = module(h, emb) if isinstance(module, Resample) else module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(F.silu(self.out_norm(h))).to(x.dtype)


@dataclass
class UNetOptions(BackboneOptions):
    """Options of the ``unet`` backbone (``UNet``); 0, ``[]`` or ``None`` adapt to the image shape."""

    tiny: ClassVar[dict[str, Any]] = {"channels": 8, "num_blocks": 1, "attention_resolutions": [4], "heads": 2,
                                      "num_freqs": 4}
    test_shape: ClassVar[tuple[int, ...]] = (1, 8, 8)
    channels: int = option(0, "channels of the first level (0: 32 for images up to 16 px, else 16: sized for a "
                              "CPU; ADM uses 128-256 on GPUs)", within="[0, inf)")
    channel_mult: list[int] = option([], "channel multiplier of each level, one level per resolution ([]: 1, 2, "
                                         "2, 2, ... while both sides stay even and halve to >= 4, at most 4 levels: "
                                         "28 -> 14 -> 7, 8 -> 4, 4 alone)")
    num_blocks: int = option(0, "residual blocks per encoder level, one more per decoder level (0: 1 for images "
                                "up to 32 px, else 2)", within="[0, inf)")
    attention_resolutions: Optional[list[int]] = option(None, "resolutions (a level's smaller side) with "
                                                              "self-attention (None: a level of 7 or 8 px below "
                                                              "the input's, at most 64 tokens; []: none)")
    heads: int = option(4, "attention heads", within="[1, inf)")
    head_dim: int = option(0, "features per attention head (0: the level's channels / heads)", within="[0, inf)")
    dropout: float = option(0.0, "dropout in the residual blocks", within="[0, 1)")
    num_freqs: int = option(16, "sinusoidal frequencies of each time embedding", within="[0, inf)")
    max_freq: float = option(8.0, "highest time frequency (cycles per unit time)", within="(0, inf)")

    def check_group(self, name: str) -> None:
        require(all(isinstance(m, int) and m >= 1 for m in self.channel_mult), name, "option channel_mult",
                "hold integers >= 1", self.channel_mult, self.kind)
        require(all(r >= 1 for r in self.attention_resolutions or []), name, "option attention_resolutions",
                "hold resolutions >= 1", self.attention_resolutions, self.kind)


def adapted_levels(height: int, width: int, max_levels: int = 4) -> int:
    """Levels of a U-Net on ``height x width`` images: halve while both sides are even and halve to >= 4."""
    levels = 1
    while levels < max_levels and height % 2 == 0 and width % 2 == 0 and min(height, width) // 2 >= 4:
        height, width, levels = height // 2, width // 2, levels + 1
    return levels


def resolved_unet_options(options: UNetOptions, shape: tuple[int, ...]) -> dict[str, Any]:
    """The ``UNet`` arguments for images of ``shape``: adapted defaults filled in, the shape checked."""
    if len(shape) != 3:
        raise ValueError(f"backbone 'unet' takes images (C, H, W); got samples of shape {shape}")
    _, height, width = shape
    size = max(height, width)
    channels = options.channels or (32 if size <= 16 else 16)
    mult = tuple(options.channel_mult) or (1, 2, 2, 2)[:adapted_levels(height, width)]
    factor = 2 ** (len(mult) - 1)
    if height % factor or width % factor:
        raise ValueError(f"option channel_mult {list(mult)} of backbone 'unet' halves the resolution {len(mult) - 1} "
                         f"time(s), which needs H and W divisible by {factor}; got images of shape {shape}")
    resolutions = [min(height, width) // 2 ** level for level in range(len(mult))]
    if options.attention_resolutions is None:
        attention = tuple(r for r in resolutions[1:] if r in (7, 8))
    else:
        attention = tuple(options.attention_resolutions)
        unknown = sorted(set(attention) - set(resolutions))
        if unknown:
            raise ValueError(f"option attention_resolutions of backbone 'unet' names resolution(s) {unknown}, but the "
                             f"levels of images of shape {shape} have resolutions {resolutions}")
    for level, r in enumerate(resolutions):
        if r in attention and options.head_dim == 0 and (channels * mult[level]) % options.heads:
            raise ValueError(f"option heads = {options.heads} of backbone 'unet' does not divide the "
                             f"{channels * mult[level]} channels at resolution {r}; set head_dim")
    num_blocks = options.num_blocks or (1 if size <= 32 else 2)
    return dict(channels=channels, channel_mult=mult, num_blocks=num_blocks, attention_resolutions=attention,
                heads=options.heads, head_dim=options.head_dim, dropout=options.dropout,
                num_freqs=options.num_freqs, max_freq=options.max_freq)


@register_backbone("unet", UNetOptions)
def build_unet(options: UNetOptions, shape: tuple[int, ...], num_classes: int) -> UNet:
    """An ADM/EDM-style U-Net for images, with separate embeddings of s and t - s (FiLM in every block)."""
    return UNet(tuple(shape), num_classes=num_classes, **resolved_unet_options(options, tuple(shape)))
