"""The sparse gradient of a table: deduplicated ids + summed fp32 rows (DESIGN §4, §12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The row-gradient arena grows to the rows wanted plus 1/ARENA_HEADROOM of them.
ARENA_HEADROOM = 16


def bag_index(offsets: torch.Tensor, n_hits: int) -> torch.Tensor:
    """The bag of every hit, from bag start offsets (``embedding_bag`` layout)."""
    lengths = torch.diff(offsets, append=torch.tensor([n_hits], dtype=offsets.dtype,
                                                       device=offsets.device))
    return torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), lengths)


def sum_rows_by_id(
    ids: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None = None,
    src: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deduplicate ``ids`` [M] and sum ``weights[i] * rows[src[i]]`` per distinct id.

    ``src`` maps each hit to the row of ``rows`` it draws from (default: hit i uses row i).
    The sum runs through ``embedding_bag`` over hits sorted by id, so no [M, d] intermediate is
    ever built. Returns (sorted unique ids [U], summed rows [U, d]).
    """
    sorted_ids, order = torch.sort(ids)
    unique_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    if weights is None:
        sample_weights = torch.ones(order.numel(), dtype=rows.dtype, device=rows.device)
    else:
        sample_weights = weights.reshape(-1)[order].to(rows.dtype)
    source = order if src is None else src[order]
    summed = F.embedding_bag(source, rows, offsets, per_sample_weights=sample_weights,
                             mode="sum")
    return unique_ids, summed


class SparseGrad:
    """The rows of one table that backward passes touched since the last :meth:`zero`, the
    ``.grad`` of a table: several layers sharing the table, several micro-batches and the
    reductions over ranks all :meth:`add` here; :meth:`coalesce` sums them once per optimizer
    step; the sparse optimizer reads and zeroes it.

    It also keeps the row-gradient arena: fp32 rows a backward may write its row gradients
    into, reused step after step, so the largest per-step buffer is not faulted in afresh each
    time (on CPU that costs as much as writing it)."""

    def __init__(self, dim: int) -> None:
        self._ids: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []
        self._coalesced: tuple[torch.Tensor, torch.Tensor] | None = None
        self._arena = torch.empty(0, dim)  # CPU: the C++ backward writes into it
        self._arena_used = self._arena_wanted = 0

    def add(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """``ids`` sorted and unique (as :func:`sum_rows_by_id` returns them), ``rows`` [U, d]."""
        self._ids.append(ids)
        self._rows.append(rows)
        self._coalesced = None
        arena = self._arena
        if arena.numel() and rows.data_ptr() == arena[self._arena_used:].data_ptr():
            self._arena_used += rows.shape[0]
        elif rows.device.type == "cpu":  # only the CPU backward writes into the arena
            self._arena_wanted = max(self._arena_wanted, self._arena_used + rows.shape[0])

    def arena(self, device: torch.device) -> torch.Tensor:
        """Free rows [R, d] (fp32) of this step's arena on ``device``, for a backward to write
        into (none elsewhere than on the CPU, where the C++ backward fills it)."""
        if self._arena.device != device:
            return self._arena.new_empty(0, self._arena.shape[1], device=device)
        return self._arena[self._arena_used:]

    def coalesce(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sorted unique ids [U], fp32 row gradients [U, d]) summed over every :meth:`add`
        since the last :meth:`zero`, or None if no row was touched."""
        if not self._ids:
            return None
        if self._coalesced is None:
            if len(self._ids) == 1:  # one backward: already sorted, unique and summed
                self._coalesced = (self._ids[0], self._rows[0].float())
            else:
                self._coalesced = sum_rows_by_id(torch.cat(self._ids),
                                                 torch.cat(self._rows).float())
            self._ids, self._rows = [self._coalesced[0]], [self._coalesced[1]]
        return self._coalesced

    def zero(self) -> None:
        self._ids, self._rows, self._coalesced = [], [], None
        self._arena_used = 0
        if self._arena_wanted > self._arena.shape[0]:  # grown for the next step
            # with headroom: the distinct rows of random batches wander around their mean, and
            # each new maximum would fault in a fresh arena (~0.5 ms per MiB here)
            rows = self._arena_wanted + self._arena_wanted // ARENA_HEADROOM
            self._arena = self._arena.new_empty(rows, self._arena.shape[1])
        self._arena_wanted = 0
