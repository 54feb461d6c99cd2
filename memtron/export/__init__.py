"""Exports of a checkpoint: on-disk row-block banks (and Hugging Face model directories)."""
