"""A value table whose rows come from a RowStore (DESIGN §11).

``StoreValueTable`` implements the ValueTable ``lookup`` contract for inference over any
:class:`~memtron.storage.store.RowStore` (RAM, a memory-mapped bank, a memory server), so the
model code is the same whether the table is in RAM, on disk or remote: the storage kind
"read-only store" with the local lookup. Each lookup (``fetch`` included: unit weights) fetches
every distinct row once; an LRU cache keeps hot rows on the model's device between steps.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from memtron.model.tables import TableSpec, ValueTable
from memtron.storage.store import RowStore


class StoreValueTable(ValueTable):
    """Read-only table ``spec`` over ``store`` (of ``spec``'s shape); ``cache_rows`` > 0
    keeps that many recently used rows on the device (least recently used evicted first)."""

    def __init__(self, spec: TableSpec, store: RowStore, cache_rows: int = 0) -> None:
        super().__init__(spec)
        self.store = store
        self.cache_rows = cache_rows
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # row id -> cache slot, LRU first
        self._cache: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self.stats = {"lookups": 0, "rows_requested": 0, "cache_hits": 0, "rows_fetched": 0,
                      "bytes_fetched": 0}

    def lookup(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and weights.requires_grad:
            raise RuntimeError("StoreValueTable is read-only (inference); train with the "
                               "model's own value tables")
        n_tokens, hits = ids.shape
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = self.rows(unique, weights.device)
        offsets = torch.arange(0, n_tokens * hits, hits, device=ids.device)
        out = F.embedding_bag(inverse, rows, offsets,
                              per_sample_weights=weights.reshape(-1).to(rows.dtype), mode="sum")
        return out.to(weights.dtype)

    def rows(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rows of distinct ``ids`` [U] on ``device``, from the cache or the store."""
        self.stats["lookups"] += 1
        self.stats["rows_requested"] += ids.numel()
        if self.cache_rows == 0:
            return self._fetch(ids).to(device)
        if self._cache is None:
            self._cache = torch.empty(self.cache_rows, self.dim, dtype=self.store.dtype,
                                      device=device)
        wanted = ids.tolist()
        if len(wanted) > self.cache_rows:  # a step larger than the cache: bypass it
            return self._fetch(ids).to(device)
        missing = [i for i in wanted if i not in self._slot_of]
        self.stats["cache_hits"] += len(wanted) - len(missing)
        for i in wanted:
            if i in self._slot_of:
                self._slot_of.move_to_end(i)
        if missing:
            fetched = self._fetch(torch.tensor(missing, dtype=torch.int64)).to(device)
            free = self.cache_rows - len(self._slot_of)
            slots = list(range(len(self._slot_of), len(self._slot_of) + min(free, len(missing))))
            while len(slots) < len(missing):  # evict least recently used rows not wanted now
                _, slot = self._slot_of.popitem(last=False)
                slots.append(slot)
            self._cache[torch.tensor(slots, device=device)] = fetched
            self._slot_of.update(zip(missing, slots))
        index = torch.tensor([self._slot_of[i] for i in wanted], device=device)
        return self._cache[index]

    def _fetch(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` in a reused host buffer (fresh pages per step cost more than the
        gather); valid until the next fetch, so callers use or copy them at once."""
        n = ids.numel()
        if self._buffer is None or self._buffer.shape[0] < n:
            self._buffer = torch.empty(n, self.dim, dtype=self.store.dtype)
        rows = self.store.fetch(ids.cpu(), out=self._buffer[:n])
        self.stats["rows_fetched"] += rows.shape[0]
        self.stats["bytes_fetched"] += rows.numel() * rows.element_size()
        return rows

    def fetch_stats(self) -> dict[str, float]:
        """Counters since creation, plus the cache hit rate over requested rows."""
        stats: dict[str, float] = dict(self.stats)
        requested = max(1, self.stats["rows_requested"])
        stats["cache_hit_rate"] = self.stats["cache_hits"] / requested
        return stats

    def extra_repr(self) -> str:
        return f"{self.name!r}: rows={self.n_rows}, dim={self.dim}, " \
               f"store={type(self.store).__name__}, cache_rows={self.cache_rows}"
