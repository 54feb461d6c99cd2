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
So the bank fetches blocks: a level is a row-sharded table (``ShardedValueTable``) whose
``fetch`` is its routed lookup with unit weights; one hit per sequence, so the exchange of
distinct rows wins as soon as sequences share nodes (counts all-gathered, one uneven
all-to-all of node ids, one of rows back; backward, one of row gradients to the owners).
"""

from __future__ import annotations

from memtron.config import BankConfig


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
