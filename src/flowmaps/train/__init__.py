"""Training: config schema, loop, EMA and weight files."""
