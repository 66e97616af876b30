"""Consistency models: maps anchored at ``t = 0`` (``F(x, s, 0)``) and consistency trajectory models.

A consistency model ``f(x, s)`` maps any point of a probability-flow path to the path's data end.
In this convention it is the two-time flow map evaluated at ``t = 0``: ``f(x, s) = F(x, s, 0)``,
and its boundary condition ``f(x, 0) = x`` is ``F(x, 0, 0) = x``, built into ``FlowMap``. The
consistency condition ``d/ds F(x_s, s, 0) = 0`` along a path is the Eulerian rule at ``t = 0``.
Methods anchored at ``t = 0`` train nothing but ``F(x, s, 0)``: they are sampled with the
``consistency`` sampler (jump to data, re-noise, repeat; ``flowmaps.samplers``). CTM trains the
two-time jumps ``F(x_s, s, t)`` and is sampled by composition.
"""
