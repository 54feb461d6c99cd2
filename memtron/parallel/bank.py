"""The hierarchical bank sharded over the memory-parallel (ep) group (DESIGN §4, §5).

Each level's table is row-sharded like a value table (rank r owns node rows ``[r*c, (r+1)*c)``,
torch.chunk layout, so a level with fewer nodes than ranks leaves some ranks empty), stored once
in the whole job, checkpointed as shards of the global ``[n_nodes, row]`` tensor (DTensor,
reshards to any ep), and updated by the sparse row optimizer on the owner.

Which moves: the blocks, or the tokens? Per sequence and bank layer, with ``d`` = d_model,
``L`` = tokens per sequence, ``b_l`` = neurons per block of level l (fp32 values):

* block fetch (the block comes to the sequence's rank): the row there, its gradient back,
  ``2 * 3 d * sum_l b_l`` values; and a node shared by several sequences of a rank (every
  upper-level node is) travels once per rank, not once per sequence;
* token dispatch (the sequence goes to each block's owner, one owner per level): x there and
  y back in the forward, dy there and dx back in the backward, ``4 * L * d * levels`` values.

Block fetch moves less whenever ``1.5 * sum_l b_l < L * levels``: for the published setup
(blocks of ~650 neurons per layer over 4 levels, L = 2048) that is ~8.4x fewer bytes, for
``configs/hier-tiny.yaml`` (sum b = 112, L = 128, 3 levels) 2.3x (:func:`exchange_bytes`
computes both). It also keeps the FFN compute with the tokens, so hot nodes load no owner.
So the bank fetches blocks: one uneven all-to-all of distinct node ids per level (counts
exchanged by the dispatcher), one of rows back; backward, one of row gradients to the owners.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from memtron.config import BankConfig, Config
from memtron.model.memory.hierarchical import (
    BankTableFactory,
    init_bank_rows,
    local_bank_table,
)
from memtron.model.memory.values import STORAGE_DTYPES
from memtron.parallel.dispatch import make_dispatch
from memtron.parallel.memory import ShardedValueTable, _whole_tables
from memtron.parallel.state import ParallelState


class ShardedBankTable(ShardedValueTable):
    """This rank's node rows of one bank level, and the row fetch that makes ``fetch`` behave
    as if the whole level were local."""

    def __init__(self, n_rows: int, dim: int, seed: int, std: torch.Tensor,
                 group: dist.ProcessGroup, rank: int, size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.row_std = std
        super().__init__(n_rows, dim, seed, group, rank, size, dtype=dtype)

    def reset_parameters(self) -> None:
        init_bank_rows(self.weight, self.row_start, self.seed, self.row_std)

    def fetch(self, ids: torch.Tensor) -> torch.Tensor:
        """Global node rows ``ids`` [n] -> fp32 rows [n, dim]. Each distinct id is asked of its
        owner once (ids as int32, counts exchanged by the dispatcher); the owner serves its
        rows through its local lookup, which records their gradients when the answers' gradients
        come back through ``combine``'s backward."""
        wanted, inverse = torch.unique(ids, return_inverse=True)
        bounds = torch.tensor(self.bounds, device=ids.device)
        owner = torch.searchsorted(bounds, wanted, right=True) - 1
        route = make_dispatch(owner, self.group, self.ep_size)
        asked = route.dispatch((wanted - bounds[owner]).to(self.index_dtype)).long()
        ones = torch.ones(asked.numel(), dtype=torch.float32, device=ids.device)
        served = self.lookup_bags(asked, ones, torch.arange(asked.numel(), device=ids.device))
        return route.combine(served)[inverse]


def bank_table_factory(cfg: Config, state: ParallelState) -> BankTableFactory:
    """The ``make_bank_table`` the model is built with for this layout: whole level tables
    when value tables are whole (ep=1, replicated), else row-sharded over ep."""
    dtype = STORAGE_DTYPES[cfg.memory.value_dtype]
    if _whole_tables(cfg, state):
        return functools.partial(local_bank_table, dtype=dtype)

    def make(level: int, n_rows: int, dim: int, seed: int, std: torch.Tensor):
        return ShardedBankTable(n_rows, dim, seed, std, state.ep_group, state.ep_rank, state.ep,
                                dtype=dtype)

    return make


def exchange_bytes(cfg: BankConfig, d_model: int, seq_len: int,
                   value_bytes: int = 4) -> dict[str, int]:
    """Bytes one sequence moves per training step (forward + backward, all bank layers) when
    every block it uses is remote: ``block_fetch`` (rows there, row gradients back; an upper
    bound, shared nodes travel once per rank) and ``token_dispatch`` (activations to each
    level's owner and back, gradients likewise). See the module docstring."""
    layers = len(cfg.layers)
    block = 2 * 3 * d_model * sum(cfg.block_sizes) * layers * value_bytes
    tokens = 4 * seq_len * d_model * cfg.levels * layers * value_bytes
    return {"block_fetch": block, "token_dispatch": tokens}
