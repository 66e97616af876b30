"""Sample figures: 2D panels share the data panel's colour scale."""

import numpy as np
import torch
from PIL import Image

from flowmaps.plots import panel_densities, plot_panels


def test_panels_are_densities_on_the_data_panels_colour_scale():
    g = torch.Generator().manual_seed(0)
    data = torch.rand(20_000, 2, generator=g) * 2 - 1  # uniform on [-1, 1]^2: density 1/4
    piled = torch.cat([data[:10_000], torch.zeros(10_000, 2)])  # half the mass on one point
    outside = data + 10.0  # every sample outside the window
    densities, vmax = panel_densities({"data": data, "piled": piled, "outside": outside}, limit=1.0, bins=20)
    cell = (2.0 / 20) ** 2
    for name in ("data", "piled"):
        assert np.isclose(densities[name].sum() * cell, 1.0)  # a density over the window
    assert densities["outside"].sum() == 0.0  # no NaN from an empty window
    assert np.isclose(np.median(densities["data"]), 0.25, rtol=0.1)
    assert vmax == densities["data"].max()
    # the pile's bin is far above the shared limit, and the rest of its panel keeps the data's scale
    assert densities["piled"].max() > 50 * vmax
    assert np.isclose(np.median(densities["piled"]), 0.125, rtol=0.15)


def test_plot_panels_writes_a_png(tmp_path):
    x = torch.randn(5_000, 2, generator=torch.Generator().manual_seed(1))
    plot_panels({"data": x, "model": 0.5 * x}, tmp_path / "samples.png", title="t")
    with Image.open(tmp_path / "samples.png") as image:
        assert image.format == "PNG" and image.width > image.height
