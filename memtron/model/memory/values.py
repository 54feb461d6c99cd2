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

from memtron.model.memory import counter_rng, cpu_kernels, kernels

# Storage types of value tables (``memory.value_dtype``) and of their first moments.
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Elements per chunk of rows of the torch init, by device type: on CPU its temporaries (a few
# MiB) stay in cache (1.5x faster on one thread than 16x larger chunks); a GPU takes larger
# chunks, fewer launches (its temporaries ~0.5 GiB at most).
INIT_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 23}


def init_rows(weight: torch.Tensor, row_start: int, seed: int, columns: slice | None = None,
              full_dim: int | None = None) -> None:
    """Fill ``weight`` (rows ``row_start ...``, and ``columns`` of ``full_dim`` if given, of a
    table) with N(0, 1/full_dim) from ``counter_rng.normal``: each value a function of (seed,
    global row, column) alone, so any shard, thread count or device gets the rows of the whole
    table. The C++ extension writes CPU tables in place; elsewhere torch ops run by chunks of
    rows."""
    weight = weight.detach()  # a Parameter: written outside autograd
    dim = full_dim or weight.shape[1]
    col_start = (columns.start or 0) if columns is not None else 0
    std = dim**-0.5
    if cpu_kernels.available(weight):
        cpu_kernels.init_normal(weight, row_start, col_start, seed, counter_rng.INIT_STREAM, std)
        return
    chunk = INIT_CHUNK.get(weight.device.type, INIT_CHUNK["cuda"])
    step = max(1, chunk // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        rows = torch.arange(row_start + start, row_start + min(start + step, weight.shape[0]),
                            device=weight.device)
        weight[start : start + rows.numel()] = counter_rng.normal(
            seed, counter_rng.INIT_STREAM, rows, col_start, weight.shape[1], std)


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


def rounding_keys(table: LocalValueTable, ids: torch.Tensor, step: int) -> torch.Tensor:
    """The stochastic-rounding key of local rows ``ids`` of ``table`` at optimizer ``step``:
    keyed by (table seed, step, global row), so a resharded or resumed run rounds alike."""
    return counter_rng.row_keys(table.seed, counter_rng.ROUND_STREAM, step, ids + table.row_start)


def store_rows(table: LocalValueTable, ids: torch.Tensor, rows: torch.Tensor, step: int) -> None:
    """Write fp32 ``rows`` (consumed) to local rows ``ids`` of ``table``. A bf16 table rounds
    them stochastically with bits keyed by (table seed, ``step``, global row, column), so the
    rounding is unbiased, and a resumed or resharded run rounds exactly as the original."""
    weight = table.weight.detach()
    if weight.dtype == torch.bfloat16:
        rows = counter_rng.stochastic_round_bf16(rows, rounding_keys(table, ids, step),
                                                 table.col_start)
    weight.index_copy_(0, ids, rows.to(weight.dtype))


class LazyDecay:
    """Weight decay a table's rows still owe (``optim.memory_weight_decay_mode=global``).

    ``clock`` (0-dim fp64) is the sum over all optimizer steps so far of ``log(1 - lr_t*wd)``;
    ``row_clock`` [rows] fp64 is the clock up to which each stored row has been decayed. A
    stored row times ``exp(clock - row_clock)`` is the row a dense optimizer that decays
    every row every step would hold. The tensors are the optimizer's state (checkpointed and
    sharded with the rows); the table reads them so that its lookups see decayed rows."""

    def __init__(self, row_clock: torch.Tensor, clock: torch.Tensor) -> None:
        self.row_clock, self.clock = row_clock, clock

    def factors(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 decay owed by local rows ``ids`` (1 for rows decayed up to now)."""
        return torch.exp(self.clock - self.row_clock.index_select(0, ids)).float()


# The row-gradient arena grows to the rows wanted plus 1/ARENA_HEADROOM of them.
ARENA_HEADROOM = 16


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
        self._arena = torch.empty(0, dim)  # see arena(); CPU, for the C++ backward
        self._arena_used = self._arena_wanted = 0
        # Per-slot hit counts over the usage window (not checkpointed: a monitoring window).
        self.register_buffer("hits", torch.zeros(n_rows, dtype=torch.int32), persistent=False)
        self.served = 0  # hits served since take_served(): an owner's share of the work

    # -- contract --------------------------------------------------------------------------
    def lookup(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids [T, H*k] int64, weights [T, H*k] -> [T, dim]; differentiable in weights and rows."""
        raise NotImplementedError

    # -- sparse gradient ---------------------------------------------------------------------
    def accumulate_grad(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """``ids`` sorted and unique (as :func:`sum_rows_by_id` returns them)."""
        self._grad_ids.append(ids)
        self._grad_rows.append(rows)
        self._coalesced = None
        arena = self._arena
        if arena.numel() and rows.data_ptr() == arena[self._arena_used:].data_ptr():
            self._arena_used += rows.shape[0]
        elif rows.device.type == "cpu":  # only the CPU backward writes into the arena
            self._arena_wanted = max(self._arena_wanted, self._arena_used + rows.shape[0])

    def arena(self) -> torch.Tensor:
        """Free rows [R, dim] (fp32) of this step's row-gradient arena, for a backward to write
        its row gradients into: reused step after step, so the largest per-step buffer is not
        faulted in afresh each time (on CPU that costs as much as writing it)."""
        return self._arena[self._arena_used:]

    def sparse_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sorted unique ids [U], fp32 row gradients [U, dim]) summed over every recorded
        backward since the last :meth:`zero_grad_rows`, or None if no row was touched."""
        if not self._grad_ids:
            return None
        if self._coalesced is None:
            if len(self._grad_ids) == 1:  # one backward: already sorted, unique and summed
                self._coalesced = (self._grad_ids[0], self._grad_rows[0].float())
            else:
                self._coalesced = sum_rows_by_id(torch.cat(self._grad_ids),
                                                 torch.cat(self._grad_rows).float())
            self._grad_ids, self._grad_rows = [self._coalesced[0]], [self._coalesced[1]]
        return self._coalesced

    def zero_grad_rows(self) -> None:
        self._grad_ids, self._grad_rows, self._coalesced = [], [], None
        self._arena_used = 0
        if self._arena_wanted > self._arena.shape[0]:  # grown for the next step
            # with headroom: the distinct rows of random batches wander around their mean, and
            # each new maximum would fault in a fresh arena (~0.5 ms per MiB here)
            rows = self._arena_wanted + self._arena_wanted // ARENA_HEADROOM
            self._arena = self._arena.new_empty(rows, self._arena.shape[1])
        self._arena_wanted = 0

    # -- usage -------------------------------------------------------------------------------
    def take_served(self) -> int:
        served, self.served = self.served, 0
        return served

    def record_hits(self, local_ids: torch.Tensor) -> None:
        self.served += local_ids.numel()
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


# Elements of the fp32 [hits, dim] temporaries of one chunk of _weight_grad_by_chunks (64 MiB).
WEIGHT_GRAD_CHUNK = 1 << 24


def _bag_weight_grad_supported(weight: torch.Tensor) -> bool:
    """Whether embedding_bag's per-sample-weight backward takes this table: its CUDA kernel
    (``_embedding_bag_per_sample_weights_backward_cuda``) has no bf16 version."""
    return weight.device.type == "cpu" or weight.dtype != torch.bfloat16


def _weight_grad_by_chunks(grad_out: torch.Tensor, table: torch.Tensor, ids: torch.Tensor,
                           bags: torch.Tensor) -> torch.Tensor:
    """grad_w[i] = <grad_out[bags[i]], table[ids[i]]> in fp32, in chunks of hits whose
    gathered rows stay within WEIGHT_GRAD_CHUNK elements (never a whole [hits, dim] copy): the
    torch path's weight gradient where embedding_bag's own backward lacks the table dtype."""
    n = ids.numel()
    grad_w = torch.empty(n, dtype=torch.float32, device=grad_out.device)
    step = max(1, WEIGHT_GRAD_CHUNK // max(1, table.shape[1]))
    for start in range(0, n, step):
        end = min(start + step, n)
        rows = table[ids[start:end]].float()
        grad_w[start:end] = rows.mul_(grad_out[bags[start:end]]).sum(1)
    return grad_w


class _BagLookup(torch.autograd.Function):
    """``out[b] = sum over hits i of bag b: weights[i] * table[ids[i]]``, sparse backward.
    On CUDA both passes run as Triton kernels (``kernels.py``: fp32 sums, a backward that
    reads each touched row once); on CPU the backward runs the same one-pass algorithm in a
    C++ extension (``cpu_kernels.py``) when it builds. The torch ops below are the reference
    and the fallback."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                offsets: torch.Tensor, table: LocalValueTable, scale: torch.Tensor | None):
        # ``rows`` is the table weight, an input only so that backward runs when the weights
        # need no gradient; its gradient goes to the table, never to ``rows.grad``.
        # ``scale`` [hits]: per-hit factors the stored rows are read with (lazy weight decay
        # owed, LazyDecay): out sums weights * scale * row, the row gradients are those of the
        # scaled rows (summed with ``weights``), and the weights' gradients take the scale.
        ctx.save_for_backward(weights, ids, offsets, scale)
        ctx.table = table
        if scale is not None:
            weights = weights * scale.to(weights.dtype)
        if kernels.use_triton(rows):
            return kernels.bag_gather(rows, ids, weights, offsets).to(weights.dtype)
        out = F.embedding_bag(ids, rows, offsets, per_sample_weights=weights.to(rows.dtype),
                              mode="sum")
        return out.to(weights.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weights, ids, offsets, scale = ctx.saved_tensors
        table: LocalValueTable = ctx.table
        grad_out = grad_out.contiguous()
        grad_weights = _BagLookup._backward(ctx, grad_out, weights, ids, offsets, table)
        if grad_weights is not None and scale is not None:
            grad_weights = grad_weights * scale.to(grad_weights.dtype)
        return grad_weights, None, None, None, None, None

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  offsets: torch.Tensor, table: LocalValueTable) -> torch.Tensor | None:
        """Records the row gradients on ``table``; returns the weights' gradient (of the
        stored rows) or None."""
        fused = None
        if kernels.use_triton(grad_out):
            fused = kernels.bag_backward(grad_out, table.weight.detach(), ids, weights,
                                         bag_index(offsets, ids.numel()),
                                         ctx.needs_input_grad[0])
        elif cpu_kernels.available(grad_out):
            fused = cpu_kernels.bag_backward(grad_out, table.weight.detach(), ids, weights,
                                             offsets, ctx.needs_input_grad[0], table.arena())
        if fused is not None:  # one pass over the distinct rows
            unique_ids, rows, grad_weights = fused
            if ids.numel():
                table.accumulate_grad(unique_ids, rows)
            if grad_weights is not None:
                grad_weights = grad_weights.to(weights.dtype)
            return grad_weights
        bags = bag_index(offsets, ids.numel())
        grad_weights = None
        if ctx.needs_input_grad[0] and not _bag_weight_grad_supported(table.weight):
            grad_weights = _weight_grad_by_chunks(grad_out, table.weight.detach(), ids, bags)
            grad_weights = grad_weights.to(weights.dtype)
        elif ctx.needs_input_grad[0]:
            # d out[b] / d w[i] = table[ids[i]]: embedding_bag's own per-sample-weight backward
            # (a fused gather + dot, ~6x faster than gathering rows here), with the table
            # detached so autograd never forms its dense gradient.
            with torch.enable_grad():
                w = weights.detach().to(table.weight.dtype).requires_grad_(True)
                out = F.embedding_bag(ids, table.weight.detach(), offsets, per_sample_weights=w,
                                      mode="sum")
                (grad_weights,) = torch.autograd.grad(out, w, grad_out.to(out.dtype))
            grad_weights = grad_weights.to(weights.dtype)
        if ids.numel():
            table.accumulate_grad(*sum_rows_by_id(ids, grad_out.float(), weights, src=bags))
        return grad_weights


class LocalValueTable(ValueTable):
    """Rows held in this process: the whole table, or (as the base of the sharded table) the
    row range ``[row_start, row_start + n_rows)`` of a larger one. Its weight never gets a
    ``.grad``: the sparse row optimizer owns it and dense optimizers leave it out."""

    col_start = 0  # first column of the whole table held here (column-sharded tables: more)

    def __init__(self, n_rows: int, dim: int, seed: int = 0, row_start: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n_rows, dim)
        self.seed, self.row_start = seed, row_start
        self.lazy_decay: LazyDecay | None = None  # set by the optimizer (global weight decay)
        self.weight = nn.Parameter(torch.empty(n_rows, dim, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_rows(self.weight, self.row_start, self.seed)

    @classmethod
    def drawn_on_device(cls, n_rows: int, dim: int, device: torch.device | str,
                        dtype: torch.dtype = torch.float32, seed: int = 0) -> LocalValueTable:
        """The table ``cls(n_rows, dim, seed, dtype=dtype)`` with its rows drawn on ``device``
        (the same values): for large tables on a GPU, never held on the host."""
        table = cls(0, dim, seed, dtype=dtype)
        table.n_rows = n_rows
        table.weight = nn.Parameter(torch.empty(n_rows, dim, dtype=dtype, device=device))
        table.reset_parameters()
        table.hits = torch.zeros(n_rows, dtype=torch.int32, device=device)
        return table

    def lookup(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_tokens, hits = ids.shape
        offsets = torch.arange(0, n_tokens * hits, hits, device=ids.device)
        return self.lookup_bags(ids.reshape(-1), weights.reshape(-1), offsets)

    def lookup_bags(self, ids: torch.Tensor, weights: torch.Tensor,
                    offsets: torch.Tensor) -> torch.Tensor:
        """Weighted sums of local rows over variable-size bags: ids, weights [M] (local row
        numbers), offsets [B] bag starts -> [B, dim]."""
        if self.training:
            with torch.no_grad():
                self.record_hits(ids)
        scale = None if self.lazy_decay is None else self.lazy_decay.factors(ids)
        return _BagLookup.apply(weights, self.weight, ids, offsets, self, scale)

    def extra_repr(self) -> str:
        return (f"rows={self.n_rows} (from {self.row_start}), dim={self.dim}, "
                f"dtype={self.weight.dtype}")
