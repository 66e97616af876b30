"""The diagonal family: training ``V(x, t, t) = v(x, t)`` alone, the diffusion-model baseline."""
