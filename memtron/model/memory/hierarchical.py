"""Hierarchical memory bank: FFN neurons owned by cluster-tree nodes, fetched per context
(DESIGN §5).

The tree has ``levels`` levels below the root; level l has ``n_l = branching^(l+1)`` nodes,
numbered level-major without the root: node id ``offset_l + i`` with ``offset_l = sum_{j<l}
n_j`` (``memtron data cluster``'s numbering). A sequence's path is one node per level,
``p = (p_0, ..., p_{levels-1})`` [B, levels].

Math. In every bank layer, node v of level l owns ``b_l`` SwiGLU neurons ``(G_v, U_v, D_v)``,
each ``[b_l, d]``; an optional generic block ``(G_g, U_g, D_g)`` of ``generic_size`` neurons is
used by every sequence. For token x of a sequence with path p the layer computes

    y = ffn(x) + sum_l D_{p_l}^T (silu(G_{p_l} x) * U_{p_l} x) + D_g^T (silu(G_g x) * U_g x),

i.e. a SwiGLU whose neurons are the anchor's ``d_ff`` plus the fetched ``sum_l b_l`` (plus the
generic ones): the concatenation, computed without materialising it per token.

Storage. One sparse row table per level: row i = node ``offset_l + i``'s blocks of every bank
layer, ``[n_bank_layers, 3 (G, U, D), b_l, d]`` flattened. One fetch per level serves all
layers; a node's row gradient sums its layers' gradients; and the tables follow the ValueTable
contract unchanged (``TableSpec`` kind ``tree``, fetched as lookups with unit weights): unique
ids + summed row gradients, the counter-based init, the sparse row optimizer with state
living with the rows, checkpoints as shards of a global tensor, ``memtron export bank`` row-block
files addressed by node, RowStore fetches at inference. Only fetched rows ever get a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memtron.config import BankConfig
from memtron.model.tables import TableSpec, ValueTable

TABLE_PREFIX = "bank"  # level l's table is value_tables[f"bank{l}"]


def table_name(level: int) -> str:
    return f"{TABLE_PREFIX}{level}"


def level_offsets(nodes_per_level: list[int]) -> list[int]:
    """First node id of every level (level-major numbering, no root)."""
    offsets = [0]
    for n in nodes_per_level[:-1]:
        offsets.append(offsets[-1] + n)
    return offsets


def row_width(cfg: BankConfig, level: int, d_model: int) -> int:
    """Values in one row of level ``level``'s table: every bank layer's (G, U, D) block."""
    return len(cfg.layers) * 3 * cfg.block_sizes[level] * d_model


def row_std(cfg: BankConfig, level: int, d_model: int, init_std: float,
            out_std: float) -> torch.Tensor:
    """Init std of every value of a row: G and U like the anchor's w_gate / w_up, D like its
    w_down (so fetched neurons start at the anchor's scale)."""
    block = cfg.block_sizes[level] * d_model
    one_layer = torch.cat([torch.full((2 * block,), init_std), torch.full((block,), out_std)])
    return one_layer.repeat(len(cfg.layers))


def level_spec(cfg: BankConfig, level: int, d_model: int, seed: int, init_std: float,
               out_std: float, dtype: torch.dtype = torch.float32) -> TableSpec:
    """The table of level ``level``: one row per node, G and U drawn like the anchor's
    w_gate / w_up, D like its w_down; learning at ``cfg.lr_mult`` (see ``build_optimizers``)."""
    return TableSpec(table_name(level), cfg.nodes_per_level()[level],
                     row_width(cfg, level, d_model), seed, dtype,
                     std=row_std(cfg, level, d_model, init_std, out_std), kind="tree")


class TreeMemory(nn.Module):
    """The tree memory of a model (config section ``bank``): its level tables (owned and
    registered by the Transformer, which keeps all sparse tables in one place) and the generic
    blocks (dense parameters). ("Bank" names the on-disk row-block store it is exported to.)"""

    def __init__(self, cfg: BankConfig, d_model: int, tables: list[ValueTable],
                 init_std: float, out_std: float) -> None:
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        self.slot = {layer: k for k, layer in enumerate(sorted(cfg.layers))}
        self.nodes = cfg.nodes_per_level()
        self.offsets = level_offsets(self.nodes)
        self._tables = list(tables)  # a list: not this module's parameters (see ProductKeyMemory)
        self.generic = None
        if cfg.generic_size:
            generic = torch.empty(len(cfg.layers), 3, cfg.generic_size, d_model)
            nn.init.normal_(generic[:, :2], std=init_std)
            nn.init.normal_(generic[:, 2], std=out_std)
            self.generic = nn.Parameter(generic)

    @property
    def tables(self) -> list[ValueTable]:
        return self._tables

    def fetch(self, path: torch.Tensor | None) -> FetchedBlocks:
        """path [B, levels] int64 node ids -> the blocks of every bank layer for this forward
        (one row fetch per level). ``None``: no context path (e.g. a question with no routing):
        only the generic block applies (as in a bank of 0 levels)."""
        if path is None or not self.cfg.levels:  # levels 0: a generic-only bank
            return FetchedBlocks(self, [])
        if path.dim() != 2 or path.shape[1] != self.cfg.levels:
            raise ValueError(f"bank path: expected [batch, {self.cfg.levels}] node ids, got "
                             f"{list(path.shape)}")
        local = path.long() - torch.tensor(self.offsets, device=path.device)
        bad = (local < 0) | (local >= torch.tensor(self.nodes, device=path.device))
        if bool(bad.any()):
            raise ValueError(f"bank path: node ids outside the tree's levels (levels "
                             f"{self.cfg.levels}, branching {self.cfg.branching}): "
                             f"{path[bad.any(1)][:4].tolist()}")
        rows = []
        for level, table in enumerate(self._tables):
            fetched = table.fetch(local[:, level])  # [B, row width]
            rows.append(fetched.view(path.shape[0], len(self.slot), 3,
                                     self.cfg.block_sizes[level], self.d_model))
        return FetchedBlocks(self, rows)


class FetchedBlocks:
    """The blocks one forward fetched: per level [B, n_bank_layers, 3, b_l, d]."""

    def __init__(self, bank: TreeMemory, rows: list[torch.Tensor]) -> None:
        self.bank, self.rows = bank, rows

    def __contains__(self, layer: int) -> bool:
        return layer in self.bank.slot

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The bank neurons' output for layer ``layer``'s FFN input h [B, L, d] -> [B, L, d]."""
        k = self.bank.slot[layer]
        blocks = [rows[:, k] for rows in self.rows]  # [B, 3, b_l, d] per level
        generic = self.bank.generic
        if generic is not None:
            blocks.append(generic[k].unsqueeze(0).expand(h.shape[0], -1, -1, -1))
        if not blocks:
            return torch.zeros_like(h)
        w = torch.cat(blocks, dim=2).to(h.dtype)  # [B, 3, sum b, d]: the concatenated neurons
        gate = torch.einsum("bld,bnd->bln", h, w[:, 0])
        up = torch.einsum("bld,bnd->bln", h, w[:, 1])
        return torch.einsum("bln,bnd->bld", F.silu(gate) * up, w[:, 2])


def bank_parameters(cfg: BankConfig, d_model: int) -> tuple[int, int]:
    """(parameters in the whole bank, parameters one sequence fetches), over all bank layers."""
    per_node = [3 * b * d_model * len(cfg.layers) for b in cfg.block_sizes]
    total = sum(n * p for n, p in zip(cfg.nodes_per_level(), per_node))
    return total, sum(per_node)

