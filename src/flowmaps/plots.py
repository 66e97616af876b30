"""Figures of samples (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from flowmaps.files import atomic_write


def plot_panels(
    panels: dict[str, torch.Tensor], path: Union[str, Path], title: str = "", limit: Optional[float] = None,
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """One 2D histogram per panel (the first two coordinates), side by side, saved as a PNG (atomically,
    with ``metadata`` as PNG text chunks).

    The square window is ``[-limit, limit]^2``; by default 1.25 times the 99.5th percentile of
    ``|x|`` in the first panel (the data), so every data set is framed alike.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if limit is None:
        first = next(iter(panels.values())).reshape(-1).float().abs()
        limit = 1.25 * float(torch.quantile(first[:100_000], 0.995))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items()):
        x = x.reshape(x.shape[0], -1).float().numpy()
        y = x[:, 1] if x.shape[1] > 1 else 0 * x[:, 0]
        ax.hist2d(x[:, 0], y, bins=120, range=[[-limit, limit], [-limit, limit]], cmap="magma")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata=metadata))
    finally:
        plt.close(fig)
