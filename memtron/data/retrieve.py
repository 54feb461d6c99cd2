"""``memtron data retrieve``: the explicit memories of every training chunk, computed once.

Retrieval embeds text, which is too slow to do in the training loop's critical path, and its
result depends only on the data and the store, so it is precomputed: for every sample of
prepared shards, the inputs (its first ``seq_len`` tokens) are cut into chunks of ``chunk``
tokens and each chunk gets the top-``r`` memory ids of the store's retriever, on the chunk's
own text (decoded with the store's tokenizer). The ids are added to the shards as the per-sample
field ``memory_ids`` int64 ``[ceil(seq_len / chunk), r]`` (:func:`memtron.data.shards.
add_sample_field`), so the loader hands them out with the tokens, split and resumed alike.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtron.data.shards import add_sample_field, read_index
from memtron.model.memory.explicit import ExplicitStore, Retriever

FIELD = "memory_ids"


def chunk_memory_ids(retriever: Retriever, tokens: np.ndarray, r: int, chunk: int,
                     batch_size: int = 1024) -> np.ndarray:
    """tokens [n, seq_len + 1] -> memory ids int64 [n, ceil(seq_len / chunk), r]: chunk j of a
    sample is its input tokens ``[j*chunk, (j+1)*chunk)`` (the last one may be shorter)."""
    n, sample_len = tokens.shape
    seq_len = sample_len - 1
    n_chunks = math.ceil(seq_len / chunk)
    pieces = [tokens[i, j * chunk:min((j + 1) * chunk, seq_len)].tolist()
              for i in range(n) for j in range(n_chunks)]
    out = [retriever.retrieve(pieces[s:s + batch_size], r)
           for s in range(0, len(pieces), batch_size)]
    ids = torch.cat(out) if out else torch.zeros(0, r, dtype=torch.long)
    return ids.numpy().reshape(n, n_chunks, r)


def retrieve_shards(shards: str | Path, store: str | Path, r: int = 5, chunk: int = 64,
                    batch_size: int = 1024, use_faiss: bool | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Add field ``memory_ids`` to the prepared shards at ``shards`` from the store at
    ``store`` (module doc); returns a summary. The store must have been built with the
    tokenizer the shards were prepared with."""
    if r < 1 or chunk < 1:
        raise ValueError(f"r ({r}) and chunk ({chunk}) must be >= 1")
    index, _ = read_index(shards)
    meta = ExplicitStore.open(store).manifest
    if index.get("tokenizer") != meta["tokenizer"]:
        raise ValueError(f"{Path(shards) / 'index.json'}: tokenizer {index.get('tokenizer')!r},"
                         f" but {store} was built with {meta['tokenizer']!r}")
    retriever = Retriever.load(store, use_faiss=use_faiss)
    total, started = int(index["n_samples"]), time.perf_counter()
    done = 0

    def ids_of(tokens: np.ndarray, first: int) -> np.ndarray:
        nonlocal done
        ids = chunk_memory_ids(retriever, tokens, r, chunk, batch_size)
        done += len(tokens)
        if progress:
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"  {done:,}/{total:,} samples ({rate:,.0f}/s)", file=sys.stderr, flush=True)
        return ids

    new_index = add_sample_field(shards, FIELD, ids_of)
    return {"shards": str(shards), "store": str(store), "samples": total, "r": r,
            "chunk": chunk, "field": FIELD, "shape": new_index["fields"][FIELD]["shape"],
            "index": "faiss" if retriever.use_faiss else "numpy",
            "seconds": round(time.perf_counter() - started, 2)}
