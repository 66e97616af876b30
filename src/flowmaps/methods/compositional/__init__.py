"""Compositional methods: train ``F(F(x_s, s, u), u, t) = F(x_s, s, t)`` (spec §2).

The compositional rule needs no derivative, only sequential calls of the map. With
``F = x + (t - s) V`` it reads, in average-velocity form,

    (t - s) V(x_s, s, t) = (u - s) V(x_s, s, u) + (t - u) V(F(x_s, s, u), u, t),

so the big step's average velocity is the length-weighted mean of the two small steps' ones. With
the boundary condition ``F(x, t, t) = x`` (built into ``FlowMap``) the rule alone does not pin the
map to the data: every method adds something that does (the diagonal loss, a teacher, or the
conditional velocity).
"""
