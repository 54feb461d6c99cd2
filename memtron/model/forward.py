"""What one forward pass needs besides the tokens (DESIGN §2).

One ``Transformer.forward(tokens, ctx)`` serves training, evaluation and generation: the
``ForwardContext`` says where the tokens sit in their sequences (positions), which earlier
keys and values they may attend to (the KV cache), which keys are padding, and which explicit
(Memory^3) memories each 64-token chunk sees in the memory layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device type (params and optimizer state stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


class KVCache:
    """Keys and values of every attention layer for ``batch`` sequences of up to ``max_len``
    tokens, preallocated on first use (device and dtype follow the first keys written).

    A forward over L new tokens writes them after the ``length`` cached ones in every layer;
    :meth:`advance` then moves ``length`` on, once per forward, after all layers wrote.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int) -> None:
        self.batch, self.max_len = batch, max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KV, L, D] for ``layer``; returns all keys and values so far,
        [B, KV, length + L, D]."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        if self.keys[layer] is None:
            shape = (self.batch, k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the sequences ``rows`` (e.g. drop finished ones from a batch)."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]
        self.batch = int(rows.numel())


@dataclass
class MemoryKV:
    """The explicit memories one attention layer sees (DESIGN §6).

    ``k``, ``v``: [B, KV, n_chunks * slots, D]: the ``slots`` (= r memories x m tokens) keys and
    values of every chunk, chunk j's at ``[j * slots, (j + 1) * slots)``. Keys are post-RoPE and
    sit in one shared reference interval before position 0 (see :class:`ExplicitKV`).
    ``query_chunk``: [L] or [B, L] chunk index of every query; query i sees exactly the slots of
    chunk ``query_chunk[i]`` (all of them: memories are not causal) besides its causal context.
    """

    k: torch.Tensor
    v: torch.Tensor
    slots: int
    query_chunk: torch.Tensor

    @property
    def n_chunks(self) -> int:
        return self.k.shape[2] // self.slots


@dataclass
class ExplicitKV:
    """Explicit memories of every ``chunk``-token chunk of a batch, for the memory layers.

    ``keys``, ``values``: [n_mem_layers, B, KV, n_chunks, slots, D], memory layer i being
    attention layer ``layers[i]``; chunk j covers RoPE positions ``[j * chunk, (j + 1) * chunk)``,
    so a query's chunk is its position // chunk (zigzag positions under context parallelism and
    cached positions in generation give the right chunk with no extra bookkeeping).
    ``chunks``: the (ascending) chunk numbers held, when only some are (a context-parallel rank
    holds the chunks of its own positions); None = chunks 0..n_chunks-1.

    Positions: the memories' keys were rotated at their references' own positions
    ``0..ref_len-1``; :func:`memtron.model.memory.explicit_kv.explicit_kv` rotates them by
    ``-ref_len``, into ``[-ref_len, 0)``, one interval shared by all memories. RoPE scores depend
    only on position differences, so this equals placing the context after the reference
    interval (context at ``ref_len + p``) while the context's own queries, keys and KV cache stay
    at their true positions, as in the layers without memory and the stage trained without it.
    """

    keys: torch.Tensor
    values: torch.Tensor
    layers: tuple[int, ...]
    chunk: int = 64
    chunks: torch.Tensor | None = None

    def query_chunks(self, positions: torch.Tensor) -> torch.Tensor:
        """The index among the held chunks of each query's chunk (position // chunk)."""
        query_chunk = torch.div(positions, self.chunk, rounding_mode="floor")
        if self.chunks is not None:
            query_chunk = torch.searchsorted(self.chunks.to(positions.device), query_chunk)
        return query_chunk

    def layer(self, index: int, query_chunk: torch.Tensor) -> MemoryKV | None:
        """The memories of attention layer ``index`` for queries whose held-chunk indices are
        ``query_chunk`` (:meth:`query_chunks`, computed once per forward for all layers);
        None if it is not a memory layer."""
        if index not in self.layers:
            return None
        i = self.layers.index(index)
        k, v = self.keys[i], self.values[i]
        return MemoryKV(k.flatten(2, 3), v.flatten(2, 3), k.shape[3], query_chunk)

    def check(self, positions: torch.Tensor) -> None:
        """Every query must have its chunk's memories (a missing chunk is a caller bug)."""
        needed = torch.div(positions, self.chunk, rounding_mode="floor").unique()
        held = (self.chunks.to(needed.device) if self.chunks is not None
                else torch.arange(self.keys.shape[3], device=needed.device))
        missing = needed[~torch.isin(needed, held)]
        if missing.numel():
            raise ValueError(f"explicit memories cover {held.numel()} chunks of {self.chunk} "
                             f"tokens; queries need chunk(s) {missing.tolist()[:8]} too")


@dataclass
class ForwardContext:
    """``positions``: [L] (every row) or [B, L] RoPE positions of the new tokens; default
    ``cache.length + 0..L-1``. ``key_valid``: [B, S] bool over all keys the new tokens may see
    (cached ones first), False for padding; None = no padding. ``cache``: keys and values of
    earlier tokens, extended by this forward. ``explicit``: the explicit memories the memory
    layers' chunks attend to (None: no memories)."""

    positions: torch.Tensor | None = None
    cache: KVCache | None = None
    key_valid: torch.Tensor | None = None
    # [B, levels] int64 cluster-tree node ids of each sequence's path: the hierarchical bank
    # blocks it fetches (model/memory/hierarchical.py); None = generic bank block only.
    bank_path: torch.Tensor | None = None
    explicit: ExplicitKV | None = None

    def resolve_positions(self, length: int, device: torch.device,
                          max_len: int) -> torch.Tensor:
        """The RoPE positions of ``length`` new tokens; the default ones must stay below
        ``max_len`` (the model's rotary tables), checked on the host, without a device sync."""
        if self.positions is not None:
            return self.positions.to(device)
        start = self.cache.length if self.cache is not None else 0
        if start + length > max_len:
            raise ValueError(f"{start + length} token positions requested ({start} cached + "
                             f"{length} new); the model holds model.max_seq_len={max_len}")
        return torch.arange(start, start + length, device=device)

    def attention_mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [B or 1, 1, L, S] mask of allowed (query, key) pairs, or None when plain
        causal attention over the L new tokens alone is right (training).

        The causal diagonal is aligned bottom-right: new token i sits at cache position
        ``past + i`` and sees keys ``<= past + i`` (SDPA's ``is_causal`` aligns top-left,
        which is wrong as soon as a cache holds earlier tokens).
        """
        past = self.cache.length if self.cache is not None else 0
        if past == 0 and self.key_valid is None:
            return None
        total = past + length
        query_at = torch.arange(past, total, device=device)[:, None]
        allowed = (torch.arange(total, device=device)[None, :] <= query_at)[None, None]
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, None, :total].to(device)
            # A padding query may see no key at all; let it see the causal keys so softmax
            # stays finite (its output is never read by a real token, whose keys exclude it).
            allowed = allowed | (~allowed.any(-1, keepdim=True)
                                 & (torch.arange(total, device=device) <= query_at))
        return allowed
