"""Tolerances derived from the magnitudes and the dtype, not from what one CPU happened to give.

Two computations of the same value that differ only in operation order (a cached forward vs a
whole-sequence one, another batch shape and so another GEMM blocking, another thread count)
agree to a few rounding errors of their dtype, relative to the magnitude of the values summed.
Asserting a fixed ``atol`` tuned on one machine fails on the next (an AMD EPYC CPU blocks its
GEMMs differently from the Intel one that wrote the test).
"""

from __future__ import annotations

import torch

# Rounding errors allowed per value: the reductions in these tests are short (d <= 256 terms,
# a few layers), so a few hundred ulps of the largest magnitude bound any reordering.
ULPS = 128


def order_atol(reference: torch.Tensor, dtype: torch.dtype | None = None,
               ulps: int = ULPS) -> float:
    """Absolute tolerance for ``reference`` recomputed in another operation order: ``ulps``
    machine epsilons of ``dtype`` (default: the reference's) times its largest magnitude."""
    eps = torch.finfo(dtype or reference.dtype).eps
    return ulps * eps * float(reference.detach().abs().max().clamp_min(1e-30))
