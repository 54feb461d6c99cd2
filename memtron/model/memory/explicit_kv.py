"""Explicit memories into attention: memory ids -> the :class:`ExplicitKV` of a forward.

The store (``memtron.model.memory.explicit.ExplicitStore``) gives, per memory id, the K and V of
its m most-attended tokens in every memory layer and KV head, [n_mem_layers, KV, m, D], keys
rotated at the reference's own positions ``0..ref_len-1``. Here they are decoded once into an
LRU cache (memories recur: popular references, a chunk's neighbours), laid out per chunk and
rotated into the shared reference interval ``[-ref_len, 0)`` (see :class:`ExplicitKV`). Used by
the training loader (continual stage) and by generation alike.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from memtron.model.attention import apply_rope, rope_tables
from memtron.model.forward import ExplicitKV


class MemoryStore(Protocol):
    """What is read from an explicit-memory store: ids -> K, V [n, n_mem_layers, KV, m, D]."""

    manifest: dict[str, Any]

    def fetch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def explicit_kv(k: torch.Tensor, v: torch.Tensor, layers: Sequence[int], chunk: int,
                ref_len: int, theta: float) -> ExplicitKV:
    """k, v [B, n_chunks, r, n_mem_layers, KV, m, D] (chunk j's r memories) -> ExplicitKV with
    keys, values [n_mem_layers, B, KV, n_chunks, r * m, D]; keys rotated by ``-ref_len``
    (RoPE with base ``theta``), so every memory sits in ``[-ref_len, 0)``."""
    def layout(t: torch.Tensor) -> torch.Tensor:
        return t.permute(3, 0, 4, 1, 2, 5, 6).flatten(4, 5)

    keys, values = layout(k), layout(v)
    cos, sin = rope_tables(torch.tensor([ref_len], device=k.device), k.shape[-1], theta)
    keys = apply_rope(keys, cos[0], -sin[0])  # the inverse rotation: by -ref_len
    return ExplicitKV(keys, values, tuple(layers), chunk)


class ExplicitMemories:
    """Memory ids -> :class:`ExplicitKV`, fetching each memory once through an LRU cache of
    decoded memories (``cache`` memories; 0 = no cache). ``heads``: the KV heads this rank
    computes (tensor parallelism gives each rank a contiguous slice); only those are kept.
    Thread-safe, so a prefetching loader thread and the caller may share it."""

    def __init__(self, store: MemoryStore, layers: Sequence[int], chunk: int, theta: float,
                 cache: int = 1024, heads: slice | None = None) -> None:
        manifest = store.manifest
        if list(manifest["layers"]) != list(layers):
            raise ValueError(f"memory.explicit.layers: {list(layers)}, but the store holds "
                             f"memories of layers {list(manifest['layers'])}")
        self.store, self.layers, self.chunk, self.theta = store, tuple(layers), chunk, theta
        self.ref_len = int(manifest["ref_len"])
        self.capacity, self.heads = cache, heads or slice(None)
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.requested = self.hits = self.fetched = self.bytes_fetched = 0

    def fetch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [...] -> k, v [..., n_mem_layers, KV_local, m, D]; one store call for the
        memories not cached."""
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"explicit memory id {int(ids.min())} < 0: every chunk needs its "
                             "r memories (memory.explicit.r)")
        flat = ids.reshape(-1).cpu()
        unique = flat.unique().tolist()
        with self._lock:
            found = {i: self._cache[i] for i in unique if i in self._cache}
            for i in found:
                self._cache.move_to_end(i)
            missing = [i for i in unique if i not in found]
            self.requested += len(unique)
            self.hits += len(found)
        if missing:
            k, v = self.store.fetch(torch.tensor(missing, dtype=torch.int64))
            k, v = k[:, :, self.heads], v[:, :, self.heads]
            with self._lock:
                self.fetched += len(missing)
                self.bytes_fetched += k.nbytes + v.nbytes
                for row, i in enumerate(missing):
                    found[i] = (k[row].clone(), v[row].clone())  # own storage: evictable
                    if self.capacity:
                        self._cache[i] = found[i]
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        order = [found[i] for i in flat.tolist()]
        k = torch.stack([kv[0] for kv in order]).unflatten(0, ids.shape)
        v = torch.stack([kv[1] for kv in order]).unflatten(0, ids.shape)
        return k, v

    def kv(self, ids: torch.Tensor, device: torch.device | str | None = None) -> ExplicitKV:
        """ids [B, n_chunks, r] (chunk j's memories) -> the ExplicitKV of a forward, on
        ``device`` (default: the store's)."""
        if ids.dim() != 3:
            raise ValueError(f"memory ids must be [B, n_chunks, r], got {tuple(ids.shape)}")
        k, v = self.fetch(ids)
        if device is not None:
            k, v = k.to(device, non_blocking=True), v.to(device, non_blocking=True)
        return explicit_kv(k, v, self.layers, self.chunk, self.ref_len, self.theta)

    def stats(self) -> dict[str, float]:
        """Memories requested (unique per call), fetched from the store, decoded bytes
        fetched, and the cache hit rate."""
        with self._lock:
            return {"memories_requested": self.requested, "memories_fetched": self.fetched,
                    "bytes_fetched": self.bytes_fetched, "cache_hits": self.hits,
                    "cache_hit_rate": self.hits / max(1, self.requested)}
