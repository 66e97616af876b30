"""Rule residuals of a trained flow map, measured on data: how far it is from being a flow map.

``composition_error`` checks the compositional rule ``F(F(x_s, s, u), u, t) = F(x_s, s, t)``
(spec §2), which every true flow map satisfies whatever method trained it, on points
``x_s = alpha(s) x_0 + sigma(s) eps`` of real data.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flowmaps.methods.base import mean_square
from flowmaps.schedules import Schedule


@torch.no_grad()
def composition_error(
    model: nn.Module,
    x0: torch.Tensor,
    schedule: Schedule,
    generator: Optional[torch.Generator] = None,
    cond: Optional[torch.Tensor] = None,
) -> dict[str, float]:
    """The compositional-rule residual of ``model`` on data ``x0`` (``[N, ...]``), in two settings.

    - ``mse``: ``E |F(F(x_s, s, u), u, t) - F(x_s, s, t)|^2`` (mean over examples and features) for
      ``1 >= s >= u >= t >= 0`` the sorted values of three uniforms, ``x_s`` on the path of a data
      point; ``relative``: that over the mean square of the jump, ``E |F(x_s, s, t) - x_s|^2``.
    - ``mse_noise_to_data`` / ``relative_noise_to_data``: the same for ``s = 1``, ``t = 0``,
      ``u ~ U[0, 1]``: the gap between one-step and two-step samples, ``F(F(eps, 1, u), u, 0)``
      against ``F(eps, 1, 0)``.

    Zero for the exact map. Maps anchored at ``t = 0`` (consistency models) are not trained at
    ``t > 0`` and show large values here. Noise and times are drawn with ``generator``.
    """
    n = x0.shape[0]
    if n < 1:
        raise ValueError(f"composition_error needs at least one data point; got x0 of shape {tuple(x0.shape)}")
    device, dtype = x0.device, x0.dtype

    def residual(s: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=dtype)
        x_s = schedule.sample_xt(x0, eps, s)
        direct = model(x_s, s, t, cond)
        composed = model(model(x_s, s, u, cond), u, t, cond)
        mse = mean_square(composed - direct).mean()
        return float(mse), float(mse / mean_square(direct - x_s).mean().clamp(min=1e-30))

    times, _ = torch.sort(torch.rand(n, 3, generator=generator, device=device, dtype=dtype), dim=1)
    mse, relative = residual(times[:, 2], times[:, 1], times[:, 0])
    u = torch.rand(n, generator=generator, device=device, dtype=dtype)
    mse_end, relative_end = residual(torch.ones_like(u), u, torch.zeros_like(u))
    return {"mse": mse, "relative": relative, "mse_noise_to_data": mse_end, "relative_noise_to_data": relative_end}
