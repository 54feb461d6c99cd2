"""The ValueTable contract (DESIGN §3) and the single-process table.

A value table maps slot ids to rows. Memory layers call ``lookup(ids, weights)`` and get
``sum_j weights[t, j] * V[ids[t, j]]``. Tables are far too large for a dense gradient, so
backward never builds one: it records the touched rows (deduplicated ids + row gradients) on
the table, where the sparse optimizer picks them up. The sharded table of the memory-parallel
group (``memtron.parallel.memory``) implements the same contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows gathered at once when computing the weight gradient; bounds the [chunk, H*k, d] buffer.
_GATHER_BUDGET = 1 << 24


def sum_rows_by_id(
    ids: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deduplicate ``ids`` and sum ``weights[i] * rows[src[i]]`` per distinct id.

    ``ids`` [M] holds one id per hit and ``rows`` [R, d] the vectors hits draw from: hit i uses
    row ``i // (M // R)`` (so ``R == M`` pairs them one to one, and ``R == T`` with ``M == T*H*k``
    maps each hit to its token). The sum runs through ``embedding_bag`` over hits sorted by id, so
    no [M, d] intermediate is ever built. Returns (sorted unique ids [U], summed rows [U, d]).
    """
    per_row = ids.numel() // rows.shape[0]
    sorted_ids, order = torch.sort(ids)
    unique_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    sample_weights = None if weights is None else weights.reshape(-1)[order].to(rows.dtype)
    if sample_weights is None:
        sample_weights = torch.ones(order.numel(), dtype=rows.dtype, device=rows.device)
    summed = F.embedding_bag(
        order // per_row, rows, offsets, per_sample_weights=sample_weights, mode="sum"
    )
    return unique_ids, summed


def weighted_row_dot(
    table: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """``out[t, j] = <table[ids[t, j]], grad_out[t]>``, gathered in bounded chunks."""
    n_tokens, hits = ids.shape
    chunk = max(1, _GATHER_BUDGET // max(1, hits * table.shape[1]))
    parts = []
    for start in range(0, n_tokens, chunk):
        rows = table[ids[start : start + chunk]]  # [c, hits, d]
        g = grad_out[start : start + chunk].to(rows.dtype).unsqueeze(-1)  # [c, d, 1]
        parts.append(torch.bmm(rows, g).squeeze(-1))
    return torch.cat(parts) if parts else grad_out.new_zeros(0, hits)


class ValueTable(nn.Module):
    """Rows addressed by slot id, with a sparse gradient kept on the table.

    Subclasses implement :meth:`lookup`. Backward passes call :meth:`accumulate_grad` with the
    rows they touched; several layers sharing a table and several micro-batches all land here,
    and :meth:`sparse_grad` coalesces them once per optimizer step.
    """

    def __init__(self, n_rows: int, dim: int) -> None:
        super().__init__()
        self.n_rows = n_rows
        self.dim = dim
        self._grad_ids: list[torch.Tensor] = []
        self._grad_rows: list[torch.Tensor] = []
        self._coalesced: tuple[torch.Tensor, torch.Tensor] | None = None
        # Per-slot hit counts over the usage window (not checkpointed: a monitoring window).
        self.register_buffer("hits", torch.zeros(n_rows, dtype=torch.int32), persistent=False)

    # -- contract --------------------------------------------------------------------------
    def lookup(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids [T, H*k] int64, weights [T, H*k] -> [T, dim]; differentiable in weights and rows."""
        raise NotImplementedError

    # -- sparse gradient ---------------------------------------------------------------------
    def accumulate_grad(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self._grad_ids.append(ids)
        self._grad_rows.append(rows)
        self._coalesced = None

    def sparse_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sorted unique ids [U], fp32 row gradients [U, dim]) summed over every recorded
        backward since the last :meth:`zero_grad_rows`, or None if no row was touched."""
        if not self._grad_ids:
            return None
        if self._coalesced is None:
            ids = torch.cat(self._grad_ids)
            rows = torch.cat(self._grad_rows).float()
            self._coalesced = sum_rows_by_id(ids, rows)
            self._grad_ids, self._grad_rows = [self._coalesced[0]], [self._coalesced[1]]
        return self._coalesced

    def zero_grad_rows(self) -> None:
        self._grad_ids, self._grad_rows, self._coalesced = [], [], None

    # -- usage -------------------------------------------------------------------------------
    def record_hits(self, local_ids: torch.Tensor) -> None:
        self.hits.index_add_(0, local_ids.reshape(-1), torch.ones_like(local_ids.reshape(-1),
                                                                        dtype=torch.int32))

    def usage(self, reset: bool = True) -> dict[str, float]:
        """Share of slots hit in the window, and how concentrated the hits are."""
        hits = self.hits.double()
        total = hits.sum().item()
        stats = {"slots_used": (hits > 0).double().mean().item()}
        if total > 0:
            top = torch.topk(hits, max(1, self.n_rows // 100)).values.sum().item()
            stats["top1pct_hit_share"] = top / total
            stats["max_slot_hit_share"] = hits.max().item() / total
        if reset:
            self.hits.zero_()
        return stats


class _LocalLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                table: LocalValueTable):
        # ``rows`` is the table weight, an input only so that backward runs when the weights
        # need no gradient; its gradient goes to the table, never to ``rows.grad``.
        ctx.save_for_backward(weights, ids)
        ctx.table = table
        out = F.embedding_bag(ids, table.weight, per_sample_weights=weights.to(table.weight.dtype),
                              mode="sum")
        return out.to(weights.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weights, ids = ctx.saved_tensors
        table: LocalValueTable = ctx.table
        grad_out = grad_out.contiguous()
        grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_weights = weighted_row_dot(table.weight, ids, grad_out).to(weights.dtype)
        unique_ids, rows = sum_rows_by_id(ids.reshape(-1), grad_out.float(), weights)
        table.accumulate_grad(unique_ids, rows)
        return grad_weights, None, None, None


class LocalValueTable(ValueTable):
    """The whole table in this process. Its weight never gets a ``.grad``: the sparse row-wise
    Adam owns it and dense optimizers must leave it out (see ``train.optim``)."""

    def __init__(self, n_rows: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n_rows, dim)
        self.weight = nn.Parameter(torch.empty(n_rows, dim, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.dim**-0.5)

    def lookup(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.record_hits(ids)
        return _LocalLookup.apply(weights, self.weight, ids, self)

    def extra_repr(self) -> str:
        return f"rows={self.n_rows}, dim={self.dim}, dtype={self.weight.dtype}"
