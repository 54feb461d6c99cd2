"""Inference: generation, and rows fetched by id from RAM, an on-disk bank or a memory server."""
