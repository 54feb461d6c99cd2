"""Two-stage explicit-memory training (DESIGN §6): the steps before ``memory.explicit.start_step``
train without memory; from it on (the continual stage) every sample's chunks attend to the
memories named by its ``memory_ids`` field (written by ``memtron data retrieve``).

Memories are fetched ahead: :class:`MemoryPrefetcher` pulls batches from the loader in a
background thread and reads, decodes, lays out and moves to the device the memories of the
next ``prefetch`` batches while the current step computes. Which micro-batch gets memories
depends only on its index in the data stream (batch n belongs to step n // grad_accum), and the
saved data position excludes the batches still queued, so a resumed run replays exactly the
batches, and the memories, of an uninterrupted one, on either side of the stage switch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from memtron.config import Config, ConfigError
from memtron.data.loader import Batch, ShardLoader
from memtron.model.forward import ExplicitKV
from memtron.model.memory.explicit_kv import ExplicitMemories
from memtron.parallel.state import ParallelState
from memtron.storage.explicit import ExplicitStore

MEMORY_FIELD = "memory_ids"


def check_memory_field(loader: ShardLoader, cfg: Config, where: str) -> None:
    """The shards must carry ``memory_ids`` [ceil(seq_len / chunk), r] per sample."""
    from memtron.data.shards import field_specs

    x = cfg.memory.explicit
    specs = field_specs(loader.index)
    expected = (-(-cfg.data.seq_len // x.chunk), x.r)
    if MEMORY_FIELD not in specs:
        raise ConfigError(f"{where}: the shards have no {MEMORY_FIELD} field (fields: "
                          f"{sorted(specs)}); run `memtron data retrieve --store "
                          f"{x.store} --r {x.r} --chunk {x.chunk}` on them first")
    shape = tuple(specs[MEMORY_FIELD].shape)
    if shape != expected:
        raise ConfigError(f"memory.explicit.r: the shards' {MEMORY_FIELD} are {list(shape)} per "
                          f"sample, memory.explicit (chunk={x.chunk}, r={x.r}) with "
                          f"data.seq_len={cfg.data.seq_len} needs {list(expected)}")


def open_training_memories(cfg: Config, state: ParallelState) -> ExplicitMemories:
    """The configured store, checked against the model, giving this rank's KV heads."""
    x, m = cfg.memory.explicit, cfg.model
    store = ExplicitStore.open(x.store, cache_rows=x.cache)
    store.check_model(m)
    per_rank = m.n_kv_heads // state.tp  # tp splits KV heads into contiguous slices
    heads = slice(state.tp_rank * per_rank, (state.tp_rank + 1) * per_rank)
    return ExplicitMemories(store, x.resolved_layers(m.n_layers), x.chunk, m.rope_theta, heads)


class MemoryPrefetcher:
    """``(Batch, ExplicitKV | None)`` pairs from ``loader``: memories for the batches of steps
    ``>= start_step`` (``grad_accum`` micro-batches a step), fetched ``depth`` batches ahead by
    a background thread. :meth:`state_dict` is the loader's position after the batches handed
    out (the queued ones excluded); load the loader's state before iterating. ``positions``:
    this rank's token positions under context parallelism (only their chunks are fetched)."""

    def __init__(self, loader: ShardLoader, memories: ExplicitMemories, start_step: int,
                 grad_accum: int, depth: int, device: torch.device,
                 positions: torch.Tensor | None = None) -> None:
        self.loader, self.memories, self.device = loader, memories, device
        self.positions = positions
        self.first_batch = start_step * grad_accum
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start: dict[str, Any] | None = None
        self._handed = 0

    def _batch_index(self, state: dict[str, Any]) -> int:
        return int(state["samples_consumed"]) // int(state["global_batch_size"])

    def __iter__(self) -> Iterator[tuple[Batch, ExplicitKV | None]]:
        if self._thread is not None:
            raise RuntimeError("MemoryPrefetcher is iterated once")
        self._start = self.loader.state_dict()
        self._thread = threading.Thread(target=self._work, args=(self._batch_index(self._start),),
                                        name="memtron-memory-prefetch", daemon=True)
        self._thread.start()
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._handed += 1
            yield item

    def _work(self, first: int) -> None:
        try:
            for n, batch in enumerate(self.loader, start=first):
                explicit = None
                if n >= self.first_batch:
                    explicit = self.memories.kv(batch.fields[MEMORY_FIELD], self.device,
                                                self.positions)
                if not self._put((batch, explicit)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def state_dict(self) -> dict[str, Any]:
        """The loader's state after the batches handed to the caller (not those queued)."""
        if self._start is None:
            return self.loader.state_dict()
        state = dict(self._start)
        batches = self._batch_index(self._start) + self._handed
        state["samples_consumed"] = batches * int(state["global_batch_size"])
        state["epoch"] = batches // self.loader.batches_per_epoch
        return state

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue or inside a fetch)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
