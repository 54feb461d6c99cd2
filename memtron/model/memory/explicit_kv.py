"""Explicit memories into attention: memory ids -> the :class:`ExplicitKV` of a forward.

The store (``memtron.storage.explicit.ExplicitStore``) gives, per memory id, the K and V of
its m most-attended tokens in every memory layer and KV head, [n_mem_layers, KV, m, D], keys
rotated at the reference's own positions ``0..ref_len-1`` (decoded, through the store's LRU
cache: memories recur). Here they are laid out per chunk and rotated into the shared reference
interval ``[-ref_len, 0)`` (see :class:`ExplicitKV`). Used by the training loader (continual
stage) and by generation alike.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from memtron.config import ConfigError
from memtron.model.attention import apply_rope, rope_tables
from memtron.model.forward import ExplicitKV


class MemoryStore(Protocol):
    """What is read from an explicit-memory store (``ExplicitStore``): ids -> K, V
    [n, n_mem_layers, KV, m, D], decoded, through the store's LRU cache of decoded memories."""

    manifest: dict[str, Any]
    stats: dict[str, int]

    def fetch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def explicit_kv(k: torch.Tensor, v: torch.Tensor, layers: Sequence[int], chunk: int,
                ref_len: int, theta: float, chunks: torch.Tensor | None = None) -> ExplicitKV:
    """k, v [B, n_chunks, r, n_mem_layers, KV, m, D] (chunk j's r memories) -> ExplicitKV with
    keys, values [n_mem_layers, B, KV, n_chunks, r * m, D]; keys rotated by ``-ref_len``
    (RoPE with base ``theta``), so every memory sits in ``[-ref_len, 0)``. ``chunks``: the chunk
    numbers of the n_chunks given, if not 0..n_chunks-1 (see :class:`ExplicitKV`)."""
    def layout(t: torch.Tensor) -> torch.Tensor:
        return t.permute(3, 0, 4, 1, 2, 5, 6).flatten(4, 5)

    keys, values = layout(k), layout(v)
    cos, sin = rope_tables(torch.tensor([ref_len], device=k.device), k.shape[-1], theta)
    keys = apply_rope(keys, cos[0], -sin[0])  # the inverse rotation: by -ref_len
    return ExplicitKV(keys, values, tuple(layers), chunk, chunks)


class ExplicitMemories:
    """Memory ids -> :class:`ExplicitKV` of a forward, from a store (whose LRU cache keeps the
    decoded memories: open it with ``cache_rows``). ``heads``: the KV heads this rank computes
    (tensor parallelism gives each rank a contiguous slice of them); only those are kept.
    Thread-safe: store reads are serialised (the training loader's prefetch thread and an
    evaluation in the main thread share the store and its cache)."""

    def __init__(self, store: MemoryStore, layers: Sequence[int], chunk: int, theta: float,
                 heads: slice | None = None) -> None:
        stored = list(store.manifest["layers"])
        if stored != list(layers):
            raise ConfigError(f"memory.explicit.layers: {list(layers)}, but the store holds "
                             f"memories of layers {stored}")
        self.store, self.layers, self.chunk, self.theta = store, tuple(layers), chunk, theta
        self.ref_len = int(store.manifest["ref_len"])
        self.heads = heads or slice(None)
        self._lock = threading.Lock()

    def kv(self, ids: torch.Tensor, device: torch.device | str | None = None,
           positions: torch.Tensor | None = None) -> ExplicitKV:
        """ids [B, n_chunks, r] (chunk j's memories) -> the ExplicitKV of a forward, on
        ``device`` (default: the store's). ``positions``: the only positions the forward reads
        (a context-parallel rank's); then only their chunks' memories are fetched."""
        if ids.dim() != 3:
            raise ValueError(f"memory ids must be [B, n_chunks, r], got {tuple(ids.shape)}")
        chunks = None
        if positions is not None:
            chunks = torch.div(positions.cpu(), self.chunk, rounding_mode="floor").unique()
            ids = ids[:, chunks]
        with self._lock:
            k, v = self.store.fetch(ids.reshape(-1))
        k, v = (t[:, :, self.heads].unflatten(0, ids.shape) for t in (k, v))
        if device is not None:
            k, v = k.to(device, non_blocking=True), v.to(device, non_blocking=True)
        if chunks is not None and device is not None:
            chunks = chunks.to(device)
        return explicit_kv(k, v, self.layers, self.chunk, self.ref_len, self.theta, chunks)

    def stats(self) -> dict[str, float]:
        """Memories fetched from the store (cache misses), the bytes read for them (as stored:
        bf16, int8 or pq codes), cache hits, and the cache hit rate over distinct memories
        per request."""
        with self._lock:
            s = dict(self.store.stats)
        fetched, hits = s["rows_fetched"], s["cache_hits"]
        return {"memories_fetched": fetched, "bytes_fetched": s["bytes_fetched"],
                "cache_hits": hits, "cache_hit_rate": hits / max(1, hits + fetched)}
