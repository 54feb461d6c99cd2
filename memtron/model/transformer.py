"""Decoder-only LM. A block is attention plus one of: a SwiGLU FFN, a product-key memory layer
in place of the FFN, or both side by side; any FFN may be extended by the blocks of a
hierarchical memory bank fetched for the sequence's cluster path (DESIGN §2, §5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memtron.config import BankConfig, Config, MemoryConfig, ModelConfig
from memtron.model.attention import CausalSelfAttention, RotaryEmbedding
from memtron.model.forward import ForwardContext, KVCache, MemoryKV
from memtron.model.memory.hierarchical import FetchedBlocks, TreeMemory, level_spec
from memtron.model.memory.product_key import ProductKeyMemory
from memtron.model.tables import STORAGE_DTYPES, LocalValueTable, TableSpec, ValueTable


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)
        self.input_hook: nn.Module = nn.Identity()  # see CausalSelfAttention.input_hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_hook(x)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, ffn: bool,
                 memory: ProductKeyMemory | None) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, index)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff) if ffn else None
        self.memory = memory

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cache: KVCache | None,
                bank: FetchedBlocks | None = None,
                memory: MemoryKV | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, memory)
        h = self.mlp_norm(x)
        if self.ffn is not None:
            x = x + self.ffn(h)
        if bank is not None and self.index in bank:  # the FFN's fetched extra neurons
            x = x + bank(self.index, h)
        if self.memory is not None:
            x = x + self.memory(h)
        return x


def table_groups(mem: MemoryConfig) -> list[list[int]]:
    """Memory layers grouped by the value table they read: shared groups, then singletons."""
    shared = [sorted(g) for g in mem.shared_tables]
    grouped = {layer for g in shared for layer in g}
    return shared + [[layer] for layer in sorted(mem.layers) if layer not in grouped]


TableFactory = Callable[[TableSpec], ValueTable]


class Transformer(nn.Module):
    """``make_table`` builds each table (value tables and tree-memory levels alike) from its
    spec; parallel code passes one that builds only this rank's shard, so a table too large
    for one process is never allocated whole, and inference one that reads rows from a store."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig,
                 make_table: TableFactory = LocalValueTable, bank: BankConfig | None = None
                 ) -> None:
        super().__init__()
        self.cfg, self.mem_cfg = cfg, mem
        self.bank_cfg = bank = bank or BankConfig()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        # Value tables live here, once each, even when several layers read them.
        self.value_tables = nn.ModuleDict()
        table_of: dict[int, ValueTable] = {}
        for g, layers in enumerate(table_groups(mem)):
            seed = int(torch.randint(0, 2**31 - 1, ()))  # from the seeded global generator
            table = make_table(TableSpec(f"table{g}", mem.n_slots, mem.value_dim or cfg.d_model,
                                         seed, STORAGE_DTYPES[mem.value_dtype]))
            self.value_tables[table.name] = table
            table_of.update({layer: table for layer in layers})
        blocks = []
        for i in range(cfg.n_layers):
            memory = None
            if i in table_of:
                memory = ProductKeyMemory(cfg.d_model, mem, table_of[i], cfg.init_std, out_std)
            ffn = memory is None or mem.placement == "beside"
            blocks.append(Block(cfg, i, ffn, memory))
        self.blocks = nn.ModuleList(blocks)
        self.bank: TreeMemory | None = None
        if bank.layers:  # level tables join the value tables: one registry of sparse tables
            levels = []
            for level in range(len(bank.nodes_per_level())):
                seed = int(torch.randint(0, 2**31 - 1, ()))
                table = make_table(level_spec(bank, level, cfg.d_model, seed, cfg.init_std,
                                              out_std, STORAGE_DTYPES[mem.value_dtype]))
                self.value_tables[table.name] = table
                levels.append(table)
            self.bank = TreeMemory(bank, cfg.d_model, levels, cfg.init_std, out_std)
        self.rope = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # The hidden state entering the output head; tensor parallelism swaps in a module
        # that sums its gradient over the tp ranks holding vocab shards of a tied head.
        self.head_input: nn.Module = nn.Identity()
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                              bias=False)
        self._init_dense(out_std)
        if bank.freeze_anchor:  # train only the bank: its tables and generic blocks
            trained = {id(t.weight) for t in self.bank.tables}
            trained |= {id(p) for p in self.bank.parameters()}
            for param in self.parameters():
                if id(param) not in trained:
                    param.requires_grad_(False)

    def _init_dense(self, out_std: float) -> None:
        nn.init.normal_(self.embed.weight, std=self.cfg.init_std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=self.cfg.init_std)
        for block in self.blocks:
            attn = block.attn
            for lin in (attn.wq, attn.wk, attn.wv):
                nn.init.normal_(lin.weight, std=self.cfg.init_std)
            nn.init.normal_(attn.wo.weight, std=out_std)
            if block.ffn is not None:
                nn.init.normal_(block.ffn.w_gate.weight, std=self.cfg.init_std)
                nn.init.normal_(block.ffn.w_up.weight, std=self.cfg.init_std)
                nn.init.normal_(block.ffn.w_down.weight, std=out_std)

    def memory_layers(self) -> list[ProductKeyMemory]:
        return [b.memory for b in self.blocks if b.memory is not None]

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(len(self.blocks), batch, max_len or self.cfg.max_seq_len)

    def forward(self, tokens: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """tokens [B, L] -> logits [B, L, vocab]; ``ctx`` defaults to a whole-sequence
        training forward (positions 0..L-1, causal, no cache)."""
        ctx = ctx or ForwardContext()
        length = tokens.shape[1]
        positions = ctx.resolve_positions(length, tokens.device, self.cfg.max_seq_len)
        rope = self.rope(positions)
        mask = ctx.attention_mask(length, tokens.device)
        query_chunk = None
        if ctx.explicit is not None:
            ctx.explicit.check(positions)
            query_chunk = ctx.explicit.query_chunks(positions)
        x = self.embed(tokens)
        bank = None
        if self.bank is not None:
            path = ctx.bank_path
            bank = self.bank.fetch(None if path is None else path.to(tokens.device))
        for i, block in enumerate(self.blocks):
            memory = None if ctx.explicit is None else ctx.explicit.layer(i, query_chunk)
            x = block(x, rope, mask, ctx.cache, bank, memory)
        if ctx.cache is not None:
            ctx.cache.advance(length)
        x = self.head_input(self.norm(x))
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, weight)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_model(cfg: Config, make_table: TableFactory = LocalValueTable) -> Transformer:
    return Transformer(cfg.model, cfg.memory, make_table, cfg.bank)
