"""Explicit memories during generation (``memtron generate --rows STORE|URL``).

Chunk j of a row covers its RoPE positions ``[j * chunk, (j + 1) * chunk)``, as in training.
Its memories are retrieved when the chunk's first token is about to be read:
  * a chunk inside the prompt is retrieved with its own text (the prompt part of it, if the
    prompt ends inside it), as the training data's ``memory_ids`` were;
  * a chunk that starts during decoding has no text yet, so it is retrieved with the
    ``chunk`` tokens before it (Memory^3 retrieves anew every 64 generated tokens).
Memories are decoded once into the LRU cache of :class:`ExplicitMemories`; the
:class:`ExplicitKV` of a forward is rebuilt only when a new chunk got its memories.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memtron.config import Config
from memtron.data.retrieve import Retriever
from memtron.model.forward import ExplicitKV
from memtron.model.memory.explicit_kv import ExplicitMemories
from memtron.storage.explicit import ExplicitStore, ExplicitStoreError

# token windows -> memory ids [len(windows), r]
RetrieveFn = Callable[[list[list[int]]], torch.Tensor]


@dataclass
class ExplicitGeneration:
    """What generation needs for explicit memories: the memories and a retriever."""

    memories: ExplicitMemories
    retrieve: RetrieveFn
    r: int


def open_explicit(spec: str, cfg: Config, tokenizer: Any, retriever_dir: str | None = None,
                  cache_rows: int | None = None, token: str | None = None) -> ExplicitGeneration:
    """Explicit memories for generation with the model of ``cfg``: the store at ``spec`` (a
    store directory or a ``memtron serve-memory`` URL, checked against the model) and the
    retriever saved in ``retriever_dir`` (default: the store directory; required for a URL).
    r, chunk and the memory layers are the checkpoint's ``memory.explicit``."""
    x = cfg.memory.explicit
    remote = spec.startswith(("http://", "https://"))
    if remote and not retriever_dir:
        raise ExplicitStoreError(f"--rows {spec}: a memory server serves memories, not the "
                                 "retriever; pass --retriever STORE_DIR (a local copy of the "
                                 "store's retriever/)")
    store = ExplicitStore.open(spec, cache_rows=x.cache if cache_rows is None else cache_rows,
                               token=token)
    store.check_model(cfg.model)
    retriever = Retriever.load(Path(retriever_dir or spec), tokenizer=tokenizer)
    memories = ExplicitMemories(store, x.resolved_layers(cfg.model.n_layers), x.chunk,
                                cfg.model.rope_theta)

    def retrieve(windows: list[list[int]]) -> torch.Tensor:
        return retriever.retrieve(windows, x.r)

    return ExplicitGeneration(memories, retrieve, x.r)


class ChunkMemories:
    """Per row, the memory ids of every chunk reached so far, and the forward's ExplicitKV."""

    def __init__(self, explicit: ExplicitGeneration, batch: int, total: int,
                 device: torch.device) -> None:
        self.explicit, self.device = explicit, device
        self.chunk = explicit.memories.chunk
        n_chunks = -(-total // self.chunk)
        self.ids = torch.full((batch, n_chunks, explicit.r), -1, dtype=torch.int64)
        self._kv: ExplicitKV | None = None
        self.retrievals = 0

    def _fill(self, wanted: list[tuple[int, int, list[int]]]) -> None:
        """Retrieve (row, chunk, token window) triples in one retriever call."""
        if not wanted:
            return
        ids = torch.as_tensor(self.explicit.retrieve([w for _, _, w in wanted]),
                              dtype=torch.int64).cpu()
        if ids.shape != (len(wanted), self.explicit.r):
            raise ValueError(f"the retriever returned ids of shape {tuple(ids.shape)}, "
                             f"expected ({len(wanted)}, {self.explicit.r})")
        for (row, chunk, _), row_ids in zip(wanted, ids):
            self.ids[row, chunk] = row_ids
        self.retrievals += len(wanted)
        self._kv = None

    def prompt(self, prompts: list[list[int]]) -> None:
        """Every chunk a prompt reaches, retrieved with its own (prompt) text."""
        self._fill([(row, j, prompt[j * self.chunk:(j + 1) * self.chunk])
                    for row, prompt in enumerate(prompts)
                    for j in range(-(-len(prompt) // self.chunk))])

    def step(self, histories: list[list[int]], positions: list[int]) -> None:
        """Before reading each row's token at ``positions[row]``: a row entering a new chunk
        retrieves it with its last ``chunk`` tokens (``histories``: each row's tokens so far,
        excluding the one being read)."""
        self._fill([(row, p // self.chunk, history[-self.chunk:])
                    for row, (history, p) in enumerate(zip(histories, positions))
                    if p % self.chunk == 0 and self.ids[row, p // self.chunk, 0] < 0])

    def kv(self, last_position: int) -> ExplicitKV:
        """The memories of chunks 0..last_position // chunk of every row. A (row, chunk) not
        reached yet (rows run at different positions under left padding) borrows the row's
        chunk 0: no query of that row attends to it."""
        n_chunks = last_position // self.chunk + 1
        if self._kv is None or self._kv.keys.shape[3] != n_chunks:
            ids = self.ids[:, :n_chunks]
            ids = torch.where(ids < 0, ids[:, :1], ids)
            self._kv = self.explicit.memories.kv(ids, self.device)
        return self._kv
