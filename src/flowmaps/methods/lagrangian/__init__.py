"""Lagrangian methods: train ``d/dt F(x_s, s, t) = v(F(x_s, s, t), t)`` (spec §2).

The Lagrangian residual is ``R_L = d/dt F(x_s, s, t) - v(F(x_s, s, t), t)``. With
``F = x + (t - s) V`` its time derivative is ``d/dt F = V + (t - s) d/dt V``, which one forward-mode
JVP along the tangent ``(x, s, t) <- (0, 0, 1)`` returns together with ``F``. In average-velocity
form the rule reads ``V(x_s, s, t) = v(F(x_s, s, t), t) - (t - s) d/dt V(x_s, s, t)``. The methods
differ in where ``v`` comes from (a teacher ``v_T``; the model's own diagonal, online or EMA weights)
and which parts sit under stop-gradient ``sg[.]`` (``docs/methods.md``). A sign check every test
relies on: for the exact flow map ``R_L = 0``; for ``F = x - (t - s) V`` (the sign-flipped map)
``R_L = -2 v`` and every loss here is large.
"""
