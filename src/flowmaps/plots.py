"""Figures of samples (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from flowmaps.files import atomic_write


def plot_panels(
    panels: dict[str, torch.Tensor], path: Union[str, Path], title: str = "", limit: Optional[float] = None,
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """One 2D histogram per panel (the first two coordinates), side by side, saved as a PNG (atomically,
    with ``metadata`` as PNG text chunks). Image panels (``[n, C, H, W]``) are drawn as image grids
    instead (``image_grid``).

    The square window is ``[-limit, limit]^2``; by default 1.25 times the 99.5th percentile of
    ``|x|`` in the first panel (the data), so every data set is framed alike. Every panel shares the
    first panel's colour scale (``panel_densities``), so equal densities look alike across panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if next(iter(panels.values())).dim() == 4:
        _plot_image_panels(panels, path, title, metadata)
        return
    if limit is None:
        first = next(iter(panels.values())).reshape(-1).float().abs()
        limit = 1.25 * float(torch.quantile(first[:100_000], 0.995))
    densities, vmax = panel_densities(panels, limit)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9), squeeze=False)
    for ax, (name, density) in zip(axes[0], densities.items()):
        ax.imshow(density.T, origin="lower", extent=(-limit, limit, -limit, limit), cmap="magma", vmin=0.0,
                  vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    _save(fig, path, title, metadata)


def panel_densities(panels: dict[str, torch.Tensor], limit: float,
                    bins: int = 120) -> tuple[dict[str, np.ndarray], float]:
    """Each panel's 2D histogram density on ``[-limit, limit]^2`` (``bins`` per axis, indexed ``[x bin, y
    bin]``; samples outside the window count in the normaliser) and the shared colour limit: the first
    panel's (the data's) largest bin, so a panel whose mass piles up saturates instead of dimming every
    other bin of its own panel."""
    densities = {}
    for name, x in panels.items():
        x = x.reshape(x.shape[0], -1).float().numpy()
        y = x[:, 1] if x.shape[1] > 1 else 0 * x[:, 0]
        counts = np.histogram2d(x[:, 0], y, bins=bins, range=[[-limit, limit], [-limit, limit]])[0]
        densities[name] = counts / (max(len(x), 1) * (2 * limit / bins) ** 2)
    vmax = float(next(iter(densities.values())).max())
    return densities, vmax if vmax > 0 else 1.0


def _save(fig, path: Union[str, Path], title: str, metadata: Optional[dict[str, str]]) -> None:
    """Title, lay out and write ``fig`` as a PNG atomically (``metadata`` as PNG text chunks), then close it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata=metadata))
    finally:
        plt.close(fig)


def image_grid(images: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """``[n, C, H, W]`` images in ``[-1, 1]`` as one ``[rows * (H + 1), per_row * (W + 1), C]`` array in
    ``[0, 1]`` (a one-pixel white gap between images), row by row."""
    n, c, h, w = images.shape
    rows = max(1, -(-n // per_row))
    grid = torch.ones(rows * (h + 1), per_row * (w + 1), c)
    pixels = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    for i in range(n):
        r, k = divmod(i, per_row)
        grid[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = pixels[i]
    return grid


def _plot_image_panels(panels: dict[str, torch.Tensor], path: Union[str, Path], title: str,
                       metadata: Optional[dict[str, str]]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.2), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items()):
        grid = image_grid(x).numpy()
        ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path, title, metadata)


def save_image_grid(images: torch.Tensor, path: Union[str, Path], per_row: int = 8) -> None:
    """``[n, C, H, W]`` images in ``[-1, 1]`` as one PNG grid (Pillow), written atomically."""
    from PIL import Image

    grid = (image_grid(images.cpu(), per_row) * 255).round().to(torch.uint8).numpy()
    picture = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    atomic_write(path, lambda tmp: picture.save(tmp, format="png"))
