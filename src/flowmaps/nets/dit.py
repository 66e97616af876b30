"""The ``dit`` backbone: a diffusion transformer with adaLN-Zero conditioning (Peebles & Xie 2023).

The image ``[B, C, H, W]`` is cut into ``p x p`` patches, each linearly embedded, plus a fixed 2-D
sin-cos position embedding; ``depth`` transformer blocks follow, each conditioned on one embedding
``e = E_s(s) + E_d(t - s) + E_c(c)`` of the source time, the interval and the class (separate time
embeddings in float32, as in the ``unet`` backbone). A block is

    (a1, b1, g1, a2, b2, g2) = Linear(silu(e))                       (zero-initialised: adaLN-Zero)
    h = h + g1 * attention(LayerNorm(h) * (1 + b1) + a1)
    h = h + g2 * MLP(LayerNorm(h) * (1 + b2) + a2)                   (MLP: width -> 4 width -> width, GELU)

and a final adaLN and linear layer (zero-initialised, so ``V = 0`` at initialisation) map each token
back to its patch's pixels. The LayerNorms (no affine parameters, as in DiT) and the attention are
the JVP-correct formulations of ``flowmaps.nets.layers``. A guidance-scale embedding (a student
conditioned on the guidance weight, spec §7) will join ``e`` later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from flowmaps.nets.layers import ConditionEmbedding, LayerNorm, SelfAttention, modulate, zero_init
from flowmaps.nets.registry import BackboneOptions, register_backbone
from flowmaps.options import option


def sincos_position_embedding(rows: int, cols: int, dim: int) -> torch.Tensor:
    """``[rows * cols, dim]``: half the features ``sin, cos(row w_k)``, half ``sin, cos(col w_k)``,
    ``w_k = 10000^(-k / (dim / 4))`` (MAE / DiT); ``dim`` divisible by 4."""
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                              indexing="ij")
    parts = [f(pos.reshape(-1, 1) * omega) for pos in (row, col) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


class DiTBlock(nn.Module):
    """Self-attention and an MLP, each behind an adaLN-Zero modulation and gate (module docstring)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads, zero_out=False)
        self.norm2 = LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))
        self.ada = zero_init(nn.Linear(width, 6 * width))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(emb)[:, None].chunk(6, dim=-1)
        h = h + gate1 * self.attn(modulate(self.norm1(h), scale1, shift1))
        return h + gate2 * self.mlp(modulate(self.norm2(h), scale2, shift2))


class DiT(nn.Module):
    """The transformer of the module docstring for images of shape ``shape = (C, H, W)``: patches of
    ``patch_size``, ``depth`` blocks of ``width`` features and ``heads`` heads, time features of
    ``num_freqs`` frequencies up to ``max_freq``. ``num_classes > 0`` adds a class embedding with a
    null class (``cond`` -1 or ``None``)."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        width: int,
        depth: int,
        heads: int,
        patch_size: int,
        dropout: float = 0.0,
        num_classes: int = 0,
        num_freqs: int = 16,
        max_freq: float = 8.0,
    ):
        super().__init__()
        self.shape, self.patch = tuple(shape), patch_size
        channels, height, width_px = shape
        self.grid = (height // patch_size, width_px // patch_size)
        self.embed_patches = nn.Linear(channels * patch_size**2, width)
        self.register_buffer("position", sincos_position_embedding(*self.grid, width), persistent=False)
        self.embedding = ConditionEmbedding(width, num_classes, num_freqs, max_freq)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, dropout) for _ in range(depth))
        self.out_norm = LayerNorm(width)
        self.out_ada = zero_init(nn.Linear(width, 2 * width))
        self.out = zero_init(nn.Linear(width, channels * patch_size**2))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, H/p * W/p, p * p * C]``."""
        b, c, p, (rows, cols) = x.shape[0], self.shape[0], self.patch, self.grid
        return x.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, p * p * c)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of ``patchify``."""
        b, c, p, (rows, cols) = tokens.shape[0], self.shape[0], self.patch, self.grid
        return tokens.reshape(b, rows, cols, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, rows * p, cols * p)

    def forward(
        self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"this dit was built for images of shape (C, H, W) = {self.shape}; got x of shape "
                             f"{tuple(x.shape)}")
        emb = F.silu(self.embedding(s, t, cond))
        h = self.embed_patches(self.patchify(x)) + self.position.to(x.dtype)
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.out_ada(emb)[:, None].chunk(2, dim=-1)
        return self.unpatchify(self.out(modulate(self.out_norm(h), scale, shift))).to(x.dtype)


@dataclass
class DiTOptions(BackboneOptions):
    """Options of the ``dit`` backbone (``DiT``); 0 adapts to the image shape."""

    tiny: ClassVar[dict[str, Any]] = {"width": 16, "depth": 1, "heads": 2, "num_freqs": 4}
    test_shape: ClassVar[tuple[int, ...]] = (2, 4, 4)
    width: int = option(0, "hidden size (0: 64 for images up to 8 px, 128 up to 32 px, 256 above)", within="[0, inf)")
    depth: int = option(0, "transformer blocks (0: 2 for images up to 8 px, else 4)", within="[0, inf)")
    heads: int = option(4, "attention heads (dividing width)", within="[1, inf)")
    patch_size: int = option(0, "patch side, dividing H and W (0: 1 below 8 px, 2 up to 16 px, 4 above)",
                             within="[0, inf)")
    dropout: float = option(0.0, "dropout in the MLPs", within="[0, 1)")
    num_freqs: int = option(16, "sinusoidal frequencies of each time embedding", within="[0, inf)")
    max_freq: float = option(8.0, "highest time frequency (cycles per unit time)", within="(0, inf)")


def resolved_dit_options(options: DiTOptions, shape: tuple[int, ...]) -> dict[str, Any]:
    """The ``DiT`` arguments for images of ``shape``: adapted defaults filled in, the shape checked."""
    if len(shape) != 3:
        raise ValueError(f"backbone 'dit' takes images (C, H, W); got samples of shape {shape}")
    _, height, width_px = shape
    size = max(height, width_px)
    patch = options.patch_size or (1 if size < 8 else 2 if size <= 16 else 4)
    if height % patch or width_px % patch:
        raise ValueError(f"option patch_size = {patch} of backbone 'dit' must divide H and W; got images of shape "
                         f"{shape}")
    width = options.width or (64 if size <= 8 else 128 if size <= 32 else 256)
    if width % 4 or width % options.heads:
        raise ValueError(f"option width = {width} of backbone 'dit' must be divisible by 4 (the 2-D position "
                         f"embedding) and by option heads = {options.heads}")
    return dict(width=width, depth=options.depth or (2 if size <= 8 else 4), heads=options.heads, patch_size=patch,
                dropout=options.dropout, num_freqs=options.num_freqs, max_freq=options.max_freq)


@register_backbone("dit", DiTOptions)
def build_dit(options: DiTOptions, shape: tuple[int, ...], num_classes: int) -> DiT:
    """A diffusion transformer on image patches, adaLN-Zero conditioned on s, t - s and the class."""
    return DiT(tuple(shape), num_classes=num_classes, **resolved_dit_options(options, tuple(shape)))
