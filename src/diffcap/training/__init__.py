"""Training captioners: the optimisation loop, the run directory, validation, distillation."""
