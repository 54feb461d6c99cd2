"""Token-sliced memory lookups under tensor parallelism (sequence-parallel style).

Memory layers are replicated over tp: every tp rank holds the same query net and sees the same
tokens. Left alone, every tp rank would repeat every lookup, so the memory exchange (and the
gathers) would cost tp times what the tokens need. :class:`TokenSlicedLookup` wraps any
:class:`ValueTable`'s ``lookup``: tp rank r looks up only rows ``[b_r, b_{r+1})`` of the
tokens (``row_bounds``, the torch.chunk layout: T need not be divisible by tp, and a rank with
no token still takes part in the table's collectives), and the results are all-gathered over
the tp group.

Communication, per lookup, over the tp group:

* forward: one all-gather of the looked-up rows, ``[T, d]`` in the weights' dtype;
* backward: one all-gather of the hit-weight gradients, ``[T, H*k]`` fp32, so the replicated
  query net gets the same full gradient on every tp rank, as it would without slicing. The
  output gradient needs no exchange: what follows a memory layer is replicated over tp, so
  every tp rank already holds the whole (identical) output gradient and keeps its own rows
  of it (the gradient of an all-gather into replicated consumers is a slice).

The table's rows then receive each token's gradient once, from one tp rank, instead of once
per tp rank: :func:`memtron.parallel.memory.reduce_table_grads` divides by dp*cp, not by the
world size, and whole tables sum their row gradients over the tp ranks too.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from memtron.config import Config
from memtron.model.tables import ValueTable
from memtron.parallel.dispatch import Traffic
from memtron.parallel.launch import to_backend
from memtron.parallel.memory import lookups_sliced, row_bounds
from memtron.parallel.state import ParallelState

# torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GatherTraffic(Traffic):
    """Bytes this rank sent to (and received from) its tp peers in the all-gathers of sliced
    lookups, forward and backward. Counted apart from the memory exchange's ``Traffic``: this
    is the price of the slicing, paid on the (usually intra-node) tp links."""

    sent = 0
    received = 0


def _all_gather_rows(x: torch.Tensor, bounds: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rank r holds rows ``[bounds[r], bounds[r+1])`` of a ``[bounds[-1], ...]`` tensor; every
    rank gets all of it. One all-gather of blocks padded to the longest share."""
    size = len(bounds) - 1
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    if longest == 0:  # no token anywhere
        return x
    wire = to_backend(x, group).contiguous()
    if wire.shape[0] < longest:
        wire = torch.cat([wire, wire.new_zeros(longest - wire.shape[0], *wire.shape[1:])])
    gathered = wire.new_empty(size * longest, *wire.shape[1:])
    _all_gather_single(gathered, wire, group=group)
    row = math.prod(x.shape[1:]) * x.element_size()
    GatherTraffic.add((size - 1) * longest * row, (size - 1) * longest * row)
    parts = gathered.view(size, longest, *wire.shape[1:])
    out = torch.cat([parts[r, : bounds[r + 1] - bounds[r]] for r in range(size)])
    return out.to(x.device)


class _SliceForLookup(torch.autograd.Function):
    """Forward: this rank's rows of a tp-replicated tensor. Backward: the rows' gradients are
    all-gathered, so every rank gets the gradient of the whole replicated input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bounds: list[int], rank: int, group) -> torch.Tensor:
        ctx.bounds, ctx.group = bounds, group
        return x[bounds[rank] : bounds[rank + 1]]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_rows(grad.contiguous(), ctx.bounds, ctx.group), None, None, None


class _GatherLookups(torch.autograd.Function):
    """Forward: all-gather every rank's rows. Backward: this rank's rows of the (replicated)
    output gradient, with no exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bounds: list[int], rank: int, group) -> torch.Tensor:
        ctx.bounds, ctx.rank = bounds, rank
        return _all_gather_rows(x, bounds, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lo, hi = ctx.bounds[ctx.rank], ctx.bounds[ctx.rank + 1]
        return grad[lo:hi], None, None, None


class TokenSlicedLookup:
    """``lookup(table, ids, weights)`` with each tp rank looking up 1/tp of the tokens, then
    all-gathered (module docstring). Equals ``table.lookup(ids, weights)`` on every tp rank."""

    def __init__(self, group: dist.ProcessGroup, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    def __call__(self, table: ValueTable, ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        bounds = row_bounds(ids.shape[0], self.size)
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        mine = _SliceForLookup.apply(weights, bounds, self.rank, self.group)
        out = table.lookup(ids[lo:hi], mine)
        return _GatherLookups.apply(out, bounds, self.rank, self.group)


def slice_lookups_over_tp(model: torch.nn.Module, cfg: Config, state: ParallelState) -> None:
    """Route every memory layer of ``model`` through a :class:`TokenSlicedLookup` over the tp
    group (in place; nothing to do at tp=1 or with ``memory.tp_slice_lookups`` off)."""
    if not lookups_sliced(cfg, state):
        return
    sliced = TokenSlicedLookup(state.tp_group, state.tp_rank, state.tp)
    for layer in model.memory_layers():
        layer.lookup_via = sliced
