"""Training: the epoch loop, optimisation steps and atomic checkpoints."""
