"""Evaluation of trained checkpoints: fact accuracy by bucket, held-out loss, comparisons."""
