"""Eulerian methods: train ``d/ds F(x_s, s, t) + grad_x F(x_s, s, t) . v(x_s, s) = 0`` (spec §2).

The Eulerian residual ``R_E = d/ds F + grad_x F . v`` is one JVP of ``F`` along the tangent
``(x, s, t) <- (v, 1, 0)``. With ``F = x + (t - s) V``,

``R_E = v - V + (t - s) D``,   ``D = d/ds V + grad_x V . v`` (the JVP of ``V`` along the same tangent),

so the rule in average-velocity form is ``V = v + (t - s) D`` (MeanFlow's target) and, solved for
the velocity, ``v = V - (t - s) D`` (improved MeanFlow's reparameterisation). The velocity is
evaluated at the *current* point ``x_s``, which is what lets MeanFlow and iMF replace it by the
conditional velocity ``u = alpha'(s) x_0 + sigma'(s) eps`` (marginal-from-conditional learning,
valid with the MSE and the target linear in ``v``).
"""
