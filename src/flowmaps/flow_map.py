"""The ``FlowMap`` wrapper: any backbone becomes a flow map ``F(x, s, t) = x + (t - s) V(x, s, t)``.

Convention (spec §1): t = 0 is data, t = 1 is noise, arguments are ``(x, s, t)`` with source time
``s`` first and target time ``t`` second. Sampling runs ``s > t``; one step is ``F(eps, 1, 0)``.
The parametrisation makes the boundary condition ``F(x, t, t) = x`` hold by construction, and the
diagonal ``v(x, t) = V(x, t, t)`` is the model's instantaneous velocity (the tangent condition): the
diagonal of a flow map *is* a diffusion model. The backbone predicts the average velocity ``V``,
much as EDM's preconditioning wrapper turns a raw network into a denoiser.

Example::

    model = FlowMap(MLP(dim=2))
    x0 = model(torch.randn(16, 2), 1.0, 0.0)        # one-step samples
    v = model.velocity(x, 0.3)                       # diffusion-model velocity
"""

from __future__ import annotations

from typing import Literal, Optional, Protocol, Union

import torch
from torch import nn

from flowmaps.conditions import Condition, labels_of, scale_of
from flowmaps.nets.embeddings import check_guidance_input, check_label_range, check_labels, classes_of, takes_guidance
from flowmaps.time_args import TimeLike, as_batch_time, check_unit_interval, expand_like


class Backbone(Protocol):
    """A network ``net(x, s, t, cond=None) -> V`` with ``V`` shaped like ``x``; ``s`` and ``t`` are ``[B]``."""

    def __call__(
        self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None
    ) -> torch.Tensor: ...


class FlowMap(nn.Module):
    """Wrap a backbone that predicts the average velocity ``V(x, s, t)`` into a flow map.

    ``forward(x, s, t)`` returns ``F(x, s, t)`` (or ``V`` with ``output="V"``); going through
    ``forward`` for both keeps the module usable under ``DistributedDataParallel``. With
    ``tangents=(dx, ds, dt)`` (time tangents as floats or ``[B]`` tensors) it returns the output and its directional
    derivative, computed by the backbone's ``forward_with_tangent`` (the ``"fused"`` JVP backend;
    ``tangent_grad=False`` for a stop-gradient tangent beside a gradient-carrying output); going
    through ``forward`` keeps that DDP-safe too. Times are floats
    or ``[B]`` tensors; with ``check_times=True`` (the default for users) they are validated to lie
    in ``[0, 1]`` and the labels ``cond`` to lie in the model's classes, which costs a device
    synchronisation, so training code passes ``False``.
    ``sampler`` names the sampler of the method that trained the map (``flowmaps.samplers.SAMPLERS``;
    ``flowmaps.load`` sets it from the run), which ``flowmaps.samplers.sample`` uses, on the grids
    ``t_k = (1 - k/N)^grid_rho`` by default (``flowmaps.load`` sets the run's ``method.grid_rho``, the
    grids its grid distillation trained; 1, uniform, for other methods). ``shape`` (one
    sample's shape) and ``num_classes`` (0: unconditional) say what the map was built for
    (``flowmaps.build.build_model`` sets them; ``num_classes`` defaults to the backbone's class
    embedding's), so a sampler can draw noise and check labels. ``cond`` may be a
    ``flowmaps.conditions.Guided`` pair of labels and guidance scales ``w`` for a network with the
    guidance input (``model.guidance``); ``guidance_range`` (the ``train.guidance_range`` it was
    trained on) bounds the scales a user may pass, and a network without the input takes only
    ``w = 1``.
    """

    def __init__(self, net: nn.Module, sampler: str = "flow_map", shape: Optional[tuple[int, ...]] = None,
                 num_classes: int = 0, guidance_range: Optional[tuple[float, float]] = None):
        super().__init__()
        self.net = net
        self.sampler = sampler
        self.grid_rho = 1.0
        self.shape = None if shape is None else tuple(shape)
        self.num_classes = num_classes or classes_of(net)
        self.guidance_range = None if guidance_range is None else (float(guidance_range[0]), float(guidance_range[1]))

    @property
    def takes_guidance(self) -> bool:
        """Whether the network has the guidance-scale input: ``F(x, s, t, c, w)`` (``model.guidance``)."""
        return takes_guidance(self.net)

    def forward(
        self,
        x: torch.Tensor,
        s: TimeLike,
        t: TimeLike,
        cond: Condition = None,
        *,
        output: Literal["F", "V"] = "F",
        check_times: bool = True,
        tangents: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
        tangent_grad: bool = True,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if output not in ("F", "V"):
            raise ValueError(f"output must be 'F' or 'V'; got {output!r}")
        sb = as_batch_time(s, x, "s")
        tb = as_batch_time(t, x, "t")
        if check_times:
            check_unit_interval(sb, "s")
            check_unit_interval(tb, "t")
            labels = labels_of(cond)
            if labels is not None and self.num_classes > 0:
                check_labels(labels, x.shape[0])
                check_label_range(labels, self.num_classes)
            check_guidance_input(scale_of(cond), self.takes_guidance, self.guidance_range)
        if tangents is not None:
            dx, ds, dt = tangents
            if dx.shape != x.shape:
                raise ValueError(f"tangent dx has shape {tuple(dx.shape)}, x has shape {tuple(x.shape)}")
            return self._with_tangent(x, sb, tb, cond, output, tangent_grad, dx, as_batch_time(ds, x, "ds"),
                                      as_batch_time(dt, x, "dt"))
        v = self.net(x, sb, tb, cond)
        if v.shape != x.shape:
            raise ValueError(f"backbone returned shape {tuple(v.shape)} for input of shape {tuple(x.shape)}")
        if output == "V":
            return v
        return x + expand_like(tb - sb, x) * v

    @property
    def has_fused_tangent(self) -> bool:
        """Whether the backbone computes JVP tangents itself: it has ``forward_with_tangent`` and its
        ``has_fused_tangent`` (default true) says that this instance supports it."""
        return callable(getattr(self.net, "forward_with_tangent", None)) and bool(
            getattr(self.net, "has_fused_tangent", True))

    def _with_tangent(self, x, s, t, cond, output, tangent_grad, dx, ds, dt):
        """``(G, dG)`` for ``G = V`` or ``F`` along ``(dx, ds, dt)``, from the backbone's own tangent:
        ``dF = dx + (dt - ds) V + (t - s) dV`` (product rule on ``F = x + (t - s) V``). Without
        ``tangent_grad`` the tangent carries no gradient (stop-gradient tangents)."""
        if not self.has_fused_tangent:
            raise ValueError(f"the backbone {type(self.net).__name__} does not compute its own tangents "
                             "(forward_with_tangent); use a JVP backend other than 'fused'")
        v, dv = self.net.forward_with_tangent(x, s, t, cond, dx, ds, dt, tangent_grad=tangent_grad)
        if v.shape != x.shape or dv.shape != x.shape:
            raise ValueError(f"backbone returned shapes {tuple(v.shape)}, {tuple(dv.shape)} for input of shape "
                             f"{tuple(x.shape)}")
        if output == "V":
            return v, dv
        v_in_tangent = v if tangent_grad else v.detach()
        return x + expand_like(t - s, x) * v, dx + expand_like(dt - ds, x) * v_in_tangent + expand_like(t - s, x) * dv

    def average_velocity(
        self, x: torch.Tensor, s: TimeLike, t: TimeLike, cond: Optional[torch.Tensor] = None, **kw
    ) -> torch.Tensor:
        """``V(x, s, t)``, with ``F(x, s, t) = x + (t - s) V(x, s, t)``."""
        return self(x, s, t, cond, output="V", **kw)

    def velocity(self, x: torch.Tensor, t: TimeLike, cond: Optional[torch.Tensor] = None, **kw) -> torch.Tensor:
        """The diagonal ``v(x, t) = V(x, t, t)``: the learned diffusion-model velocity."""
        return self(x, t, t, cond, output="V", **kw)
