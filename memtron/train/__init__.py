"""The training loop, optimizers, checkpoints and metrics."""
