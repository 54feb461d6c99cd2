"""A memtron model with product-key memory layers, for ``transformers`` (remote code).

It is transformers' own Llama (attention, RMSNorm, rotary embedding, KV caches, generation,
``device_map``) with one addition: in the layers of ``config.memory_layers`` a product-key
memory layer replaces the MLP or runs beside it. Per memory head, a normalised query is split
in two halves scored against two sub-key tables of n rows; the exact top-k of the n² sums gives
slot ids and softmax weights; the layer returns the weighted sum of those value-table rows,
gated and projected when ``memory_plus`` (``W_o(y * SiLU(W_g x))``). Several layers may read one
value table. Tables are stored as row blocks, and may stay on disk in a memory-mapped memtron
bank (``config.memory_bank``). Needs only torch and transformers, not memtron: the bank
reader ``rowblock.py`` is copied beside this file by the exporter.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
)

from .configuration_memtron import MemtronConfig

# memtron.storage.rowblock, the one reader of memtron's bank files, which ``memtron export hf``
# copies beside this file
from .rowblock import map_bank_table, read_bank_manifest


def product_key_topk(scores1: torch.Tensor, scores2: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all n*n sums ``scores1[..., i] + scores2[..., j]``: a pair in the global
    top-k has both halves in their own half's top-k, so the k*k candidate sums suffice.
    Returns (scores [..., k], slot ids i*n + j [..., k]), best first."""
    n = scores2.shape[-1]
    s1, i1 = scores1.topk(k, dim=-1)
    s2, i2 = scores2.topk(k, dim=-1)
    candidates = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    best, flat = candidates.topk(k, dim=-1)
    return best, torch.gather(i1, -1, flat // k) * n + torch.gather(i2, -1, flat % k)


def _map_bank_table(bank: Path, name: str, n_rows: int,
                    dim: int) -> tuple[list[torch.Tensor], int]:
    """Table ``name`` of a memtron bank as tensors over read-only private mappings of its block
    files (pages are read on first touch), and its rows per block."""
    manifest = read_bank_manifest(bank)
    spec = manifest["tables"].get(name)
    if spec is None or (spec["n_rows"], spec["dim"]) != (n_rows, dim):
        found = None if spec is None else [spec["n_rows"], spec["dim"]]
        raise ValueError(f"{bank / 'manifest.json'}: table {name} is {found}, the model needs "
                         f"[{n_rows}, {dim}]")
    return map_bank_table(bank, manifest, name), spec["rows_per_block"]


class MemtronValueTable(nn.Module):
    """One value table, as row blocks ``[rows_per_block, dim]`` (the last may be shorter):
    parameters ``block_{j}`` loaded with the checkpoint, or, when ``config.memory_bank`` is set,
    the blocks of a memtron bank mapped from disk on first use (never copied into RAM whole).
    The blocks are this module's own parameters, so ``device_map`` places and offloads the
    table as one unit around its ``forward``."""

    def __init__(self, config: MemtronConfig, index: int) -> None:
        super().__init__()
        self._config, self.name = config, f"table{index}"
        self.n_rows = config.memory_n_sub_keys ** 2
        self.dim = config.memory_value_dim or config.hidden_size
        self.rows_per_block = config.memory_rows_per_block or self.n_rows
        self.n_blocks = 0
        self._mapped: list[torch.Tensor] | None = None
        if config.memory_bank is None:
            for start in range(0, self.n_rows, self.rows_per_block):
                block = torch.empty(min(self.rows_per_block, self.n_rows - start), self.dim)
                nn.init.normal_(block, std=self.dim ** -0.5)
                self.register_parameter(f"block_{self.n_blocks}", nn.Parameter(block))
                self.n_blocks += 1

    def _row_blocks(self) -> tuple[list[torch.Tensor], int]:
        if self._config.memory_bank is None:
            return [getattr(self, f"block_{j}") for j in range(self.n_blocks)], \
                self.rows_per_block
        if self._mapped is None:
            bank = Path(self._config.memory_bank)
            home = Path(getattr(self._config, "name_or_path", "") or ".")
            if not bank.is_absolute() and home.is_dir():
                bank = home / bank
            self._mapped, self.rows_per_block = _map_bank_table(bank, self.name, self.n_rows,
                                                                self.dim)
        return self._mapped, self.rows_per_block

    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids [T, H*k], weights [T, H*k] -> ``sum_j weights[t, j] * V[ids[t, j]]`` [T, dim],
        in the weights' dtype; each distinct row is read once."""
        blocks, rows_per_block = self._row_blocks()
        n_tokens, hits = ids.shape
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        unique = unique.to(blocks[0].device)
        if len(blocks) == 1:
            rows = blocks[0].index_select(0, unique)
        else:  # ids are sorted: each block serves one consecutive run of them
            owners, counts = torch.unique_consecutive(unique // rows_per_block,
                                                      return_counts=True)
            rows = torch.cat([blocks[b].index_select(0, part - b * rows_per_block)
                              for b, part in zip(owners.tolist(), unique.split(counts.tolist()))])
        rows = rows.to(weights.device)
        offsets = torch.arange(0, n_tokens * hits, hits, device=weights.device)
        out = F.embedding_bag(inverse.to(weights.device), rows, offsets, mode="sum",
                              per_sample_weights=weights.reshape(-1).to(rows.dtype))
        return out.to(weights.dtype)


class MemtronProductKeyMemory(nn.Module):
    """One memory layer: its own query network and sub-keys over a (possibly shared) table."""

    def __init__(self, config: MemtronConfig, table: MemtronValueTable) -> None:
        super().__init__()
        self.n_heads, self.topk, self.d_key = (config.memory_heads, config.memory_topk,
                                               config.memory_d_key)
        self.key_norm, self.memory_plus = config.memory_key_norm, config.memory_plus
        hidden = config.hidden_size
        self.query = nn.Linear(hidden, self.n_heads * self.d_key, bias=False)
        self.query_norm = nn.RMSNorm(self.d_key) if config.memory_query_norm else None
        self.keys = nn.Parameter(torch.empty(self.n_heads, 2, config.memory_n_sub_keys,
                                             self.d_key // 2))
        bound = 1.0 / math.sqrt(self.d_key // 2)
        nn.init.uniform_(self.keys, -bound, bound)
        if self.memory_plus:
            self.gate = nn.Linear(hidden, table.dim, bias=False)
            self.out = nn.Linear(table.dim, hidden, bias=False)
        self._table = [table]  # owned by the model (shared by layers), not a submodule here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        q = self.query(flat).view(flat.shape[0], self.n_heads, self.d_key)
        if self.query_norm is not None:
            q = self.query_norm(q)
        q, keys = q.float(), self.keys.float()
        if self.key_norm:
            keys = F.rms_norm(keys, (keys.shape[-1],))
        half = self.d_key // 2
        scores1 = torch.einsum("thd,hnd->thn", q[..., :half], keys[:, 0])
        scores2 = torch.einsum("thd,hnd->thn", q[..., half:], keys[:, 1])
        best, ids = product_key_topk(scores1, scores2, self.topk)
        y = self._table[0](ids.flatten(1), torch.softmax(best, dim=-1).flatten(1))
        y = y.to(device=x.device, dtype=x.dtype)  # the table may sit on another device
        if self.memory_plus:
            y = self.out(y * F.silu(self.gate(flat)))
        return y.view(shape)


class MemtronMLP(nn.Module):
    """What fills the MLP slot of a memory layer: the memory alone (``replace``) or Llama's MLP
    plus the memory (``beside``), both reading the post-attention-norm hidden state."""

    def __init__(self, config: MemtronConfig, table: MemtronValueTable) -> None:
        super().__init__()
        self.ffn = LlamaMLP(config) if config.memory_placement == "beside" else None
        self.memory = MemtronProductKeyMemory(config, table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.memory(x)
        return out if self.ffn is None else self.ffn(x) + out


class MemtronModel(LlamaModel):
    """LlamaModel whose memory layers' MLPs are swapped for :class:`MemtronMLP`; the value
    tables live here, once each, as ``value_tables.table{g}``."""

    config_class = MemtronConfig

    def __init__(self, config: MemtronConfig) -> None:
        super().__init__(config)
        self.value_tables = nn.ModuleDict({f"table{g}": MemtronValueTable(config, g)
                                           for g in range(len(config.memory_tables))})
        for g, layers in enumerate(config.memory_tables):
            for i in layers:
                self.layers[i].mlp = MemtronMLP(config, self.value_tables[f"table{g}"])
        if config.memory_bank is not None:  # tables come from the bank, not the weights
            self._keys_to_ignore_on_load_unexpected = [r"value_tables\."]
        self.post_init()


class MemtronForCausalLM(LlamaForCausalLM):
    config_class = MemtronConfig
    _no_split_modules = ["LlamaDecoderLayer", "MemtronValueTable"]

    def __init__(self, config: MemtronConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)  # LlamaForCausalLM's body, with our model
        self.model = MemtronModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
