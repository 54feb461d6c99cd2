"""Memory parallelism: value tables sharded over the memory-parallel (ep) group (DESIGN §4).

Row-wise (the default): rank r owns rows ``[r*c, (r+1)*c)`` with ``c = ceil(N / P)`` (torch.chunk
layout, so uneven N/P and even empty ranks work, and DTensor checkpoints reshard). A lookup
groups every token's (slot, weight) hits by owner and runs, per (requester, owner) pair, the
cheaper of two exchanges:

* partial sums: send each hit (local row int32, fp32 weight, bag-start flag); the owner
  returns one weighted sum per token, ``[tokens, d]``;
* rows: send the pair's distinct rows; the owner returns them, ``[rows, d]``, and the
  requester takes the weighted sums itself (wins when few distinct slots are hot).

Both sides derive the choice from the same all-gathered counts, so no extra round trip is
needed. Backward is the mirror exchange, produced by autograd through :func:`all_to_all`;
the owner's local lookup records sparse row gradients, so no rank ever forms an N x d gradient.

Column-wise (a baseline): every rank holds all rows x d/P columns; ids and weights are
all-gathered, each rank computes its columns for every token, and an all-to-all returns each
token's columns to its rank.

Replicated (a baseline): whole tables everywhere, row gradients exchanged as a dense N x d
all-reduce, the way data parallelism treats an embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from memtron.config import Config
from memtron.model.tables import LocalValueTable, TableSpec, ValueTable
from memtron.model.transformer import TableFactory
from memtron.parallel.data_parallel import sum_table_grads
from memtron.parallel.dispatch import Dispatch, Traffic, all_to_all
from memtron.parallel.launch import to_backend
from memtron.parallel.state import ParallelState

PARTIAL, ROWS = 0, 1


# --------------------------------------------------------------------------- row-wise


def row_bounds(n_rows: int, parts: int) -> list[int]:
    """torch.chunk layout: ``ceil(n/p)`` rows per rank, the last ranks possibly short/empty."""
    chunk = math.ceil(n_rows / parts)
    return [min(r * chunk, n_rows) for r in range(parts + 1)]


def _index_dtype(n_rows: int) -> torch.dtype:
    """Smallest index type collectives carry (gloo and NCCL have no int16)."""
    return torch.int32 if n_rows <= 2**31 else torch.int64


class ShardedValueTable(LocalValueTable):
    """Storage kind "row shard", lookup strategy "all-to-all routed": this rank's row range of
    a table sharded over the ep group, plus the routing that makes ``lookup`` (and so
    ``fetch``) behave as if the whole table were local."""

    def __init__(self, spec: TableSpec, group: dist.ProcessGroup, rank: int, size: int) -> None:
        self.bounds = row_bounds(spec.rows, size)
        super().__init__(spec, row_start=self.bounds[rank],
                         n_rows=self.bounds[rank + 1] - self.bounds[rank])
        self.global_rows, self.group, self.ep_rank, self.ep_size = spec.rows, group, rank, size
        self.weight.ep_shard = (0, spec.rows)  # checkpoint: dim 0 of a [rows, dim] tensor
        self.index_dtype = _index_dtype(max(1, self.bounds[1] - self.bounds[0]))
        self.exchanges = {"partial": 0, "rows": 0}  # (requester, owner) pairs served each way

    def _modes(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair's counts [src, dst, (hits, distinct tokens, distinct rows)] and its
        exchange [src, dst]: partial sums or rows, whichever moves fewer bytes."""
        wire = to_backend(counts, self.group)
        gathered = [torch.empty_like(wire) for _ in range(self.ep_size)]
        dist.all_gather(gathered, wire, group=self.group)
        all_counts = torch.stack(gathered).to(counts.device)
        hits, tokens, rows = all_counts.unbind(-1)
        index_bytes = torch.empty(0, dtype=self.index_dtype).element_size()
        row_bytes = 4 * self.dim
        partial = hits * (index_bytes + 4 + 1) + tokens * row_bytes
        by_rows = rows * (index_bytes + row_bytes)
        return torch.where(partial <= by_rows, PARTIAL, ROWS), all_counts

    def lookup(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_tokens, hits_per_token = ids.shape
        n = self.global_rows
        device = ids.device
        bounds = torch.tensor(self.bounds, device=device)
        token = torch.arange(n_tokens, device=device).repeat_interleave(hits_per_token)
        # Merge repeated (token, slot) hits (heads that found the same slot) into one weight.
        pair, inverse = torch.unique(token * n + ids.reshape(-1), return_inverse=True)
        merged = weights.new_zeros(pair.numel()).index_add(0, inverse, weights.reshape(-1))
        token, slot = pair // n, pair % n
        owner = torch.searchsorted(bounds, slot, right=True) - 1
        # Owner-major, then token, then slot: the order hits travel in and owners read bags in.
        order = torch.argsort(owner, stable=True)
        token, slot, owner, merged = token[order], slot[order], owner[order], merged[order]
        local = slot - bounds[owner]

        counts = torch.stack([
            torch.bincount(owner, minlength=self.ep_size),
            torch.bincount(torch.unique(owner * n_tokens + token) // n_tokens,
                           minlength=self.ep_size),
            torch.bincount(torch.unique(owner * n + slot) // n, minlength=self.ep_size),
        ], dim=1)
        modes, all_counts = self._modes(counts)
        self.exchanges["partial"] += int((modes[self.ep_rank] == PARTIAL).sum())
        self.exchanges["rows"] += int((modes[self.ep_rank] == ROWS).sum())
        use_partial = modes[self.ep_rank, owner] == PARTIAL
        out = weights.new_zeros(n_tokens, self.dim)
        if bool((modes == PARTIAL).any()):
            m = use_partial
            out = out + self._partial_sums(token[m], local[m], merged[m], owner[m],
                                           (modes == PARTIAL), all_counts, n_tokens)
        if bool((modes == ROWS).any()):
            m = ~use_partial
            out = out + self._by_rows(token[m], local[m], merged[m], owner[m],
                                      (modes == ROWS), all_counts, n_tokens)
        return out

    def _received(self, chosen: torch.Tensor, all_counts: torch.Tensor, what: int) -> list[int]:
        """How many items each source sends this rank in an exchange it chose."""
        me = self.ep_rank
        return torch.where(chosen[:, me], all_counts[:, me, what], 0).tolist()

    def _partial_sums(self, token, local, weights, owner, chosen, all_counts, n_tokens):
        """Hits go to their owners; one weighted sum per (requester, token) comes back."""
        hits = Dispatch(owner, self.group, self.ep_size, self._received(chosen, all_counts, 0))
        starts = torch.ones_like(token, dtype=torch.bool)  # first hit of each (owner, token)
        starts[1:] = (owner[1:] != owner[:-1]) | (token[1:] != token[:-1])
        recv_local = hits.dispatch(local.to(self.index_dtype)).long()
        recv_weights = hits.dispatch(weights)
        recv_starts = hits.dispatch(starts.to(torch.uint8)).bool()
        sums = self.lookup_bags(recv_local, recv_weights, torch.nonzero(recv_starts).view(-1))
        # Sums return in the order their bags arrived: per source, by token; the requester's
        # bags in (owner, token) order are exactly that order.
        bags = Dispatch(owner[starts], self.group, self.ep_size,
                        self._received(chosen, all_counts, 1))
        back = bags.combine(sums)
        return back.new_zeros(n_tokens, self.dim).index_add(0, token[starts], back)

    def _by_rows(self, token, local, weights, owner, chosen, all_counts, n_tokens):
        """Each pair's distinct rows come back; the requester takes the weighted sums."""
        wanted, which = torch.unique(owner * self.global_rows + local, return_inverse=True)
        rows = Dispatch(wanted // self.global_rows, self.group, self.ep_size,
                        self._received(chosen, all_counts, 2))
        asked = rows.dispatch((wanted % self.global_rows).to(self.index_dtype)).long()
        served = self.lookup_bags(asked, torch.ones(asked.numel(), device=asked.device),
                                  torch.arange(asked.numel(), device=asked.device))
        got = rows.combine(served)  # [distinct rows wanted, d], in `wanted` order
        by_token = torch.argsort(token, stable=True)
        token = token[by_token]
        starts = torch.ones_like(token, dtype=torch.bool)
        starts[1:] = token[1:] != token[:-1]
        sums = F.embedding_bag(which[by_token], got, torch.nonzero(starts).view(-1),
                               per_sample_weights=weights[by_token].to(got.dtype), mode="sum")
        return sums.new_zeros(n_tokens, self.dim).index_add(0, token[starts], sums)


# --------------------------------------------------------------------------- column-wise


class _AllGatherRows(torch.autograd.Function):
    """All-gather of equal-size row blocks; backward sums the gradient over ranks and keeps
    this rank's block (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.size, ctx.rank = group, size, rank
        wire = to_backend(x, group).contiguous()
        parts = [torch.empty_like(wire) for _ in range(size)]
        dist.all_gather(parts, wire, group=group)
        return torch.cat(parts).to(x.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        wire = to_backend(grad, ctx.group).contiguous()
        out = torch.empty_like(wire.chunk(ctx.size)[0])
        dist.reduce_scatter_tensor(out, wire, group=ctx.group)
        moved = (ctx.size - 1) * out.numel() * out.element_size()
        Traffic.add(moved, moved)
        return out.to(grad.device), None, None, None


class ColumnShardedValueTable(LocalValueTable):
    """Storage kind "column shard": all rows, this rank's d/P columns, ids all-gathered and
    columns returned by all-to-all; the column-sharded baseline of DESIGN §4."""

    def __init__(self, spec: TableSpec, group: dist.ProcessGroup, rank: int, size: int) -> None:
        dim = spec.dim
        if dim % size:
            raise ValueError(f"memory.value_dim {dim} is not divisible by ep={size} "
                             "(column-sharded tables)")
        self.full_dim, self.group, self.ep_rank, self.ep_size = dim, group, rank, size
        # dim stays the lookup's output width (the contract); weight holds dim / P of it
        super().__init__(spec, columns=slice(rank * dim // size, (rank + 1) * dim // size))
        self.weight.ep_shard = (1, dim)

    def lookup(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_tokens, hits = ids.shape
        p, me = self.ep_size, self.ep_rank
        counts = to_backend(torch.tensor([n_tokens]), self.group)
        all_counts = [torch.empty_like(counts) for _ in range(p)]
        dist.all_gather(all_counts, counts, group=self.group)
        longest = int(max(c.item() for c in all_counts))
        pad = longest - n_tokens
        ids_p = F.pad(ids, (0, 0, 0, pad))
        weights_p = F.pad(weights, (0, 0, 0, pad))  # padded hits weigh 0
        wire = to_backend(ids_p, self.group).contiguous()
        all_ids = wire.new_empty(p * longest, hits)
        dist.all_gather_into_tensor(all_ids, wire, group=self.group)
        all_ids = all_ids.to(ids.device)
        all_weights = _AllGatherRows.apply(weights_p, self.group, p, me)
        if all(int(c) == longest for c in all_counts):
            cols = LocalValueTable.lookup(self, all_ids, all_weights)  # [p * longest, d/p]
        else:  # padding rows look nothing up: a zero-weight hit would still touch its row
            real = torch.cat([torch.arange(r * longest, r * longest + int(c), device=ids.device)
                              for r, c in enumerate(all_counts)])
            looked_up = LocalValueTable.lookup(self, all_ids[real], all_weights[real])
            cols = looked_up.new_zeros(p * longest, looked_up.shape[1]).index_copy(
                0, real, looked_up)
        mine = all_to_all(cols, [longest] * p, [longest] * p, self.group)  # [p*longest, d/p]
        out = mine.view(p, longest, self.full_dim // p)  # explicit width: longest may be 0
        out = out.permute(1, 0, 2).reshape(longest, self.full_dim)
        gathered = (p - 1) * longest * hits * (ids.element_size() + weights.element_size())
        Traffic.add(gathered, gathered)  # ids and weights all-gathered
        return out[:n_tokens]


# --------------------------------------------------------------------------- wiring


def table_factory(cfg: Config, state: ParallelState) -> TableFactory:
    """The ``make_table`` the model is built with for this layout: whole tables when
    ``memory.parallel`` is replicated or ep=1; else value tables row- or column-sharded as
    ``memory.parallel`` says, tree-memory levels always row-sharded (their rows are fetched
    whole)."""
    if _whole_tables(cfg, state):
        return LocalValueTable

    def make(spec: TableSpec) -> ValueTable:
        columns = cfg.memory.parallel == "colwise" and spec.kind == "values"
        cls = ColumnShardedValueTable if columns else ShardedValueTable
        return cls(spec, state.ep_group, state.ep_rank, state.ep)

    return make


def _whole_tables(cfg: Config, state: ParallelState) -> bool:
    return cfg.memory.parallel == "replicated" or state.ep == 1


def replica_group(cfg: Config, state: ParallelState) -> dist.ProcessGroup | None:
    """Ranks whose row gradients must be summed. Whole tables: the dp x cp ranks (tp peers
    saw the same tokens and hold identical gradients), or every rank when tp peers looked up
    different slices of the tokens (parallel/token_slice.py). Sharded tables: owners already
    hold the sums of all their requesters; over ep < world, megatron's expert-data-parallel
    group holds copies of the same shard."""
    if state.world_size == 1:
        return None
    if _whole_tables(cfg, state):
        if lookups_sliced(cfg, state):
            return dist.group.WORLD  # tp x cp x dp: all ranks
        return state.dp_cp_group if state.dp * state.cp > 1 else None
    if state.ep == state.world_size:
        return None
    from megatron.core import parallel_state as mps

    return mps.get_expert_data_parallel_group()


def reduce_table_grads(tables: list[ValueTable], cfg: Config, state: ParallelState) -> int:
    """Turn each rank's row gradients into those of the global mean loss.

    Every rank's loss is the mean over its tokens. Whole tables: summing over the dp x cp
    replicas gives dp*cp times the single-process gradient. Sharded tables: every rank looked
    up (tp peers repeating the same tokens), so the owners' sums are world_size times it;
    with token-sliced lookups each token reached the rows once, from one tp rank: dp*cp.
    Rows held on several ranks are summed over the replica group first (sparsely, or as a
    dense all-reduce for the replicated baseline). Returns the bytes this rank sent.
    """
    if state.world_size == 1:
        return 0
    group = replica_group(cfg, state)
    sent = 0
    if group is not None:
        if cfg.memory.parallel == "replicated":
            sent = dense_table_all_reduce(tables, group)
        else:
            sent = sum_table_grads(tables, group)
    once_per_tp_group = _whole_tables(cfg, state) or lookups_sliced(cfg, state)
    copies = state.dp * state.cp if once_per_tp_group else state.world_size
    for table in tables:
        grad = table.sparse_grad()
        if grad is not None:
            grad[1].div_(copies)
    return sent


def dense_table_all_reduce(tables: list[ValueTable], group: dist.ProcessGroup) -> int:
    """The replicated baseline: densify each table's row gradient and all-reduce N x d."""
    sent = 0
    for table in tables:
        dense = torch.zeros_like(table.weight, dtype=torch.float32)
        grad = table.sparse_grad()
        if grad is not None:
            dense[grad[0]] = grad[1]
        wire = to_backend(dense, group)
        dist.all_reduce(wire, group=group)
        dense = wire.to(dense.device)
        touched = torch.nonzero(dense.abs().sum(1)).reshape(-1)
        table.zero_grad_rows()
        table.accumulate_grad(touched, dense[touched])
        sent += dense.numel() * 4
    return sent


def lookups_sliced(cfg: Config, state: ParallelState) -> bool:
    """Whether tp ranks split the memory lookups among them (``memory.tp_slice_lookups``,
    parallel/token_slice.py) rather than each repeating them all."""
    return cfg.memory.tp_slice_lookups and state.tp > 1


def tables_sharded(cfg: Config, state: ParallelState) -> bool:
    return state.world_size > 1 and not _whole_tables(cfg, state)


def norm_group(cfg: Config, state: ParallelState) -> dist.ProcessGroup | None:
    """Where the squared norms of sharded row gradients must be summed for the global norm."""
    return None if _whole_tables(cfg, state) else state.ep_group


def table_norm_share(tables: Iterable[ValueTable], cfg: Config,
                     state: ParallelState) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of the squared norm of the tables' row gradients, 1 if any of its row
    gradients is not finite), fp64 scalars with no host sync. Summed over all ranks, each row
    counts once: whole tables on rank 0, a shard on the first of its copies."""
    norms = [torch.linalg.vector_norm(g[1]) for g in (t.sparse_grad() for t in tables)
             if g is not None]
    if not norms:
        zero = torch.zeros((), dtype=torch.float64)
        return zero, zero.clone()
    norms_t = torch.stack(norms).double()
    if not tables_sharded(cfg, state):
        counts = state.rank == 0
    else:
        copies = replica_group(cfg, state)
        counts = copies is None or dist.get_rank(copies) == 0
    share = norms_t.square().sum() if counts else torch.zeros_like(norms_t[0])
    return share, (~torch.isfinite(norms_t).all()).double()
