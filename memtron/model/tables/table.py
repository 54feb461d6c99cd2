"""The table contract (DESIGN §4) and the table whose rows live in this process.

A table maps slot ids to rows. Memory layers call ``lookup(ids, weights)`` and get
``sum_j weights[t, j] * V[ids[t, j]]``; tree memory calls ``fetch(ids)``, the lookup of whole
rows with unit weights. Tables are far too large for a dense gradient, so backward never builds
one: it adds the touched rows (deduplicated ids + row gradients) to the table's
:class:`SparseGrad`, where the sparse optimizer picks them up. Every table is built from a
:class:`TableSpec` and named by it.

Storage kinds x lookup strategies: :class:`LocalValueTable` (local rows, local lookup) is here;
the row shard (all-to-all routed lookup) and the column shard live in ``memtron.parallel.memory``,
the token-sliced strategy under tp in ``memtron.parallel.token_slice``, the read-only RowStore
table in ``memtron.infer.values``.
"""

from __future__ import annotations

import torch
from torch import nn

from memtron.model.memory import counter_rng, cpu_kernels
from memtron.model.tables import ops
from memtron.model.tables.grad import SparseGrad
from memtron.model.tables.spec import TableSpec

# Elements per chunk of rows of the torch init, by device type: on CPU its temporaries (a few
# MiB) stay in cache (1.5x faster on one thread than 16x larger chunks); a GPU takes larger
# chunks, fewer launches (its temporaries ~0.5 GiB at most).
INIT_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 23}


def init_rows(weight: torch.Tensor, spec: TableSpec, row_start: int = 0,
              col_start: int = 0) -> None:
    """Fill ``weight`` (rows ``row_start ...`` and columns ``col_start ...`` of the table of
    ``spec``) with N(0, std^2) from ``counter_rng.normal``: each value a function of (seed,
    global row, column) alone, so any shard, thread count or device gets the values of the
    whole table. With one std the C++ extension writes CPU tables in place; elsewhere, and
    with a std per column (drawn at std 1, then scaled), torch ops run by chunks of rows."""
    weight = weight.detach()  # a Parameter: written outside autograd
    if weight.device.type == "meta" or not weight.numel():
        return
    n_cols = weight.shape[1]
    std = spec.column_std(slice(col_start, col_start + n_cols))
    if isinstance(std, float) and cpu_kernels.available(weight):
        cpu_kernels.init_normal(weight, row_start, col_start, spec.seed,
                                counter_rng.INIT_STREAM, std)
        return
    chunk = INIT_CHUNK.get(weight.device.type, INIT_CHUNK["cuda"])
    step = max(1, chunk // n_cols)
    for start in range(0, weight.shape[0], step):
        stop = min(start + step, weight.shape[0])
        if isinstance(std, float):
            rows = torch.arange(row_start + start, row_start + stop, device=weight.device)
            weight[start:stop] = counter_rng.normal(spec.seed, counter_rng.INIT_STREAM, rows,
                                                    col_start, n_cols, std)
            continue
        block = torch.empty(stop - start, n_cols, device=weight.device)
        init_rows(block, TableSpec(spec.name, spec.rows, spec.dim, spec.seed, std=1.0),
                  row_start + start, col_start)
        weight[start:stop] = block.mul_(std.to(block.device))


def rounding_keys(table: LocalValueTable, ids: torch.Tensor, step: int) -> torch.Tensor:
    """The stochastic-rounding key of local rows ``ids`` of ``table`` at optimizer ``step``:
    keyed by (table seed, step, global row), so a resharded or resumed run rounds alike."""
    return counter_rng.row_keys(table.spec.seed, counter_rng.ROUND_STREAM, step,
                                ids + table.row_start)


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


class ValueTable(nn.Module):
    """The table contract: rows addressed by slot id, named by their :class:`TableSpec`, with
    a sparse gradient (:class:`SparseGrad`, ``grad_rows``) in place of a dense ``.grad``.

    Subclasses (storage kinds) implement :meth:`lookup`; ``n_rows`` is the rows held here.
    """

    def __init__(self, spec: TableSpec, n_rows: int | None = None, width: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec, self.name = spec, spec.name
        self.n_rows = spec.rows if n_rows is None else n_rows
        self.dim = spec.dim  # the lookup's output width
        self.grad_rows = SparseGrad(width or spec.dim)
        # Per-slot hit counts over the usage window (not checkpointed: a monitoring window).
        self.register_buffer("hits", torch.zeros(self.n_rows, dtype=torch.int32, device=device),
                             persistent=False)
        self.served = 0  # hits served since take_served(): an owner's share of the work

    # -- contract --------------------------------------------------------------------------
    def lookup(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids [T, H*k] int64, weights [T, H*k] -> [T, dim]; differentiable in weights and rows."""
        raise NotImplementedError

    def fetch(self, ids: torch.Tensor) -> torch.Tensor:
        """Whole rows: ids [n] (int64, may repeat) -> fp32 [n, dim], the lookup of one hit of
        weight 1 per id (tree memory's access); backward adds every distinct row's summed
        gradient."""
        ones = torch.ones(ids.numel(), 1, dtype=torch.float32, device=ids.device)
        return self.lookup(ids.reshape(-1, 1), ones)

    # -- sparse gradient (the optimizer's view) ----------------------------------------------
    def sparse_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`SparseGrad.coalesce` of this table's rows."""
        return self.grad_rows.coalesce()

    def accumulate_grad(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.grad_rows.add(ids, rows)

    def zero_grad_rows(self) -> None:
        self.grad_rows.zero()

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


class _BagLookup(torch.autograd.Function):
    """``out[b] = sum over hits i of bag b: weights[i] * table[ids[i]]``, sparse backward: the
    custom ops of ``tables.ops`` (the kernel of the tensors' device), the row gradients added
    to the table's :class:`SparseGrad` (the table's rows never get a dense gradient)."""

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
        return ops.bag_gather(rows.detach(), ids, weights, offsets)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weights, ids, offsets, scale = ctx.saved_tensors
        table: LocalValueTable = ctx.table
        unique_ids, rows, grad_weights = ops.bag_backward(
            grad_out, table.weight.detach(), ids, weights, offsets, ctx.needs_input_grad[0],
            table.grad_rows.arena(grad_out.device))
        if ids.numel():
            table.grad_rows.add(unique_ids, rows)
        if grad_weights is not None:
            grad_weights = grad_weights.to(weights.dtype)
            if scale is not None:
                grad_weights = grad_weights * scale.to(grad_weights.dtype)
        return grad_weights, None, None, None, None, None


class LocalValueTable(ValueTable):
    """Rows held in this process: the whole table of ``spec``, or (as the base of the sharded
    kinds) rows ``[row_start, row_start + n_rows)`` and columns ``columns`` of it, drawn on
    ``device`` (``meta``: not drawn, for weights assigned later). Its weight never gets a
    ``.grad``: the sparse row optimizer owns it and dense optimizers leave it out."""

    def __init__(self, spec: TableSpec, row_start: int = 0, n_rows: int | None = None,
                 columns: slice | None = None, device: torch.device | str | None = None) -> None:
        columns = columns or slice(0, spec.dim)
        width = columns.stop - columns.start
        super().__init__(spec, n_rows, width, device)
        self.row_start, self.col_start = row_start, columns.start
        self.lazy_decay: LazyDecay | None = None  # set by the optimizer (global weight decay)
        self.weight = nn.Parameter(torch.empty(self.n_rows, width, dtype=spec.dtype,
                                               device=device))
        init_rows(self.weight, spec, row_start, self.col_start)

    def lookup(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_tokens, hits = ids.shape
        offsets = torch.arange(0, n_tokens * hits, hits, device=ids.device)
        return self.lookup_bags(ids.reshape(-1), weights.reshape(-1), offsets)

    def lookup_bags(self, ids: torch.Tensor, weights: torch.Tensor,
                    offsets: torch.Tensor) -> torch.Tensor:
        """Weighted sums of local rows over variable-size bags: ids, weights [M] (local row
        numbers), offsets [B] bag starts -> [B, columns held]."""
        if self.training:
            with torch.no_grad():
                self.record_hits(ids)
        scale = None if self.lazy_decay is None else self.lazy_decay.factors(ids)
        return _BagLookup.apply(weights, self.weight, ids, offsets, self, scale)

    def extra_repr(self) -> str:
        return (f"{self.name!r}: rows={self.n_rows} (from {self.row_start}), dim={self.dim}, "
                f"dtype={self.weight.dtype}")
