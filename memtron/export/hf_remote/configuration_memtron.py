"""Configuration of a memtron model with product-key memory layers, for ``transformers``.

A Llama configuration plus the memory layers. It needs only transformers (not memtron): it is
copied next to the weights by ``memtron export hf`` and loaded with ``trust_remote_code=True``.

Memory fields (every one can be overridden at load time, e.g.
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, memory_bank=PATH)``):

- ``memory_layers``: decoder layers with a memory layer; ``memory_placement``: ``"replace"``
  (the memory layer takes the place of the layer's MLP) or ``"beside"`` (MLP + memory);
- ``memory_tables``: per value table ``model.value_tables.table{g}``, the layers reading it
  (layers sharing a table keep their own query network and keys);
- ``memory_heads``, ``memory_topk`` (k), ``memory_d_key``, ``memory_n_sub_keys`` (n, giving n²
  slots), ``memory_value_dim`` (0 = hidden_size), ``memory_plus`` (gated Memory+ output
  ``W_o(y * SiLU(W_g x))``), ``memory_query_norm``, ``memory_key_norm``;
- ``memory_rows_per_block``: a value table is stored as row blocks of this many rows,
  ``model.value_tables.table{g}.block_{j}``, so no table is ever one huge tensor;
- ``memory_bank``: ``None`` (value tables are weights, loaded like any other) or the path of a
  memtron row-block bank (``memtron export bank``, or ``memtron export hf --tables bank``;
  relative paths are resolved against the model directory). The tables are then memory-mapped
  from the bank's files and read row by row on demand, so a model whose tables do not fit in
  RAM still loads; the tables' weights in the checkpoint, if any, are ignored.
"""

from __future__ import annotations

from transformers import LlamaConfig


class MemtronConfig(LlamaConfig):
    model_type = "memtron"

    def __init__(self, memory_layers: list[int] | None = None,
                 memory_tables: list[list[int]] | None = None,
                 memory_placement: str = "replace", memory_plus: bool = True,
                 memory_heads: int = 4, memory_topk: int = 32, memory_d_key: int = 64,
                 memory_n_sub_keys: int = 64, memory_value_dim: int = 0,
                 memory_query_norm: bool = True, memory_key_norm: bool = False,
                 memory_rows_per_block: int = 0, memory_bank: str | None = None,
                 **kwargs) -> None:
        self.memory_layers = [int(i) for i in memory_layers or []]
        self.memory_tables = ([[int(i) for i in g] for g in memory_tables] if memory_tables
                              else [[i] for i in self.memory_layers])
        self.memory_placement = memory_placement
        self.memory_plus = memory_plus
        self.memory_heads = memory_heads
        self.memory_topk = memory_topk
        self.memory_d_key = memory_d_key
        self.memory_n_sub_keys = memory_n_sub_keys
        self.memory_value_dim = memory_value_dim
        self.memory_query_norm = memory_query_norm
        self.memory_key_norm = memory_key_norm
        self.memory_rows_per_block = memory_rows_per_block
        self.memory_bank = memory_bank
        if memory_placement not in ("replace", "beside"):
            raise ValueError(f"memory_placement: {memory_placement!r} is not replace or beside")
        if sorted(i for g in self.memory_tables for i in g) != sorted(self.memory_layers):
            raise ValueError(f"memory_tables {self.memory_tables} must hold every memory layer "
                             f"{self.memory_layers} exactly once")
        if memory_d_key % 2 or not 0 < memory_topk <= memory_n_sub_keys:
            raise ValueError(f"memory_d_key={memory_d_key} must be even and memory_topk="
                             f"{memory_topk} in [1, memory_n_sub_keys={memory_n_sub_keys}]")
        super().__init__(**kwargs)
