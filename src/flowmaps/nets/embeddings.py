"""Time embeddings for flow-map backbones."""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierTimeEmbedding(nn.Module):
    """``[t, sin(2 pi f_k t), cos(2 pi f_k t)]`` with ``num_freqs`` frequencies log-spaced in ``[1, max_freq]``.

    Frequencies are kept moderate because flow-map losses differentiate the network in time: high
    frequencies make ``d/dt`` of the embedding, and so the JVP tangents, large (the sCM paper's
    observation). ``num_freqs = 0`` gives the raw time alone.
    """

    def __init__(self, num_freqs: int = 0, max_freq: float = 8.0):
        super().__init__()
        if num_freqs < 0 or max_freq <= 0:
            raise ValueError(f"need num_freqs >= 0 and max_freq > 0; got {num_freqs}, {max_freq}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), num_freqs))
        self.register_buffer("freqs", 2 * math.pi * freqs, persistent=False)
        self.dim = 2 * num_freqs + 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.freqs.to(t.dtype)
        return torch.cat([t[:, None], torch.sin(angles), torch.cos(angles)], dim=-1)
