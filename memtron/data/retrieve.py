"""Retrieval of explicit memories: :class:`Retriever` (text chunk -> memory ids), and
``memtron data retrieve``, the explicit memories of every training chunk, computed once.

The retriever embeds a chunk with the embedder its store was built with
(:mod:`memtron.data.embed`) and ranks the memories' reference texts by inner product
(``faiss`` IndexFlatIP when installed, exact numpy otherwise: same ids).

Retrieval embeds text, which is too slow to do in the training loop's critical path, and its
result depends only on the data and the store, so it is precomputed: for every sample of
prepared shards, the inputs (its first ``seq_len`` tokens) are cut into chunks of ``chunk``
tokens and each chunk gets the top-``r`` memory ids of the store's retriever, on the chunk's
own text (decoded with the store's tokenizer). The ids are added to the shards as the per-sample
field ``memory_ids`` int64 ``[ceil(seq_len / chunk), r]`` (:func:`memtron.data.shards.
add_sample_field`), so the loader hands them out with the tokens, split and resumed alike.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtron.data.embed import HashedNgramEmbedder, load_embedder, make_embedder, save_embedder
from memtron.data.shards import add_sample_field, read_index
from memtron.data.tokenizer import load_tokenizer
from memtron.storage.explicit import RETRIEVER_DIR, ExplicitStore, ExplicitStoreError
from memtron.storage.manifest import sha256_file
from memtron.storage.rowblock import BANK_MANIFEST

FIELD = "memory_ids"


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class Retriever:
    """Top-r memory ids for text chunks: the chunk is embedded by the embedder the store was
    built with (memtron.data.embed) and compared by inner product (= cosine: rows are
    L2-normalised) with the embeddings of the memories' reference texts. Token chunks are
    decoded with the model's tokenizer first. Ties are broken by the smaller id, so the faiss
    and numpy indexes return the same ids."""

    EMBEDDINGS = "embeddings.npy"
    EMBEDDER = "embedder"  # save_embedder's stem: embedder.json (+ embedder.npy)
    META = "retriever.json"
    SCORE_BLOCK = 1 << 24  # exact search: query x memory scores held at once (64 MiB)

    def __init__(self, embedder: Any, embeddings: np.ndarray, tokenizer: Any = None,
                 use_faiss: bool | None = None) -> None:
        self.embedder, self.tokenizer = embedder, tokenizer
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.use_faiss = faiss_available() if use_faiss is None else use_faiss
        self._index = None
        if self.use_faiss:
            import faiss

            self._index = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._index.add(self.embeddings)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def build(cls, texts: Sequence[str], embedder: str = "hashed", dim: int = 256,
              tokenizer: Any = None) -> Retriever:
        """Fit the embedder (document frequencies) on the memories' texts and embed them;
        ``tokenizer`` decodes token chunks at retrieval (its spec is saved with the index)."""
        emb = make_embedder(embedder, dim)
        if isinstance(emb, HashedNgramEmbedder):
            emb.fit(texts)
        return cls(emb, emb.embed(list(texts)), tokenizer)

    def save(self, directory: str | Path) -> dict[str, str]:
        """Write the embedder and the embeddings; returns {file name: sha256}."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / self.EMBEDDINGS, self.embeddings)
        save_embedder(self.embedder, directory / self.EMBEDDER)
        files = sorted(p.name for p in directory.iterdir() if p.name != self.META)
        sums = {name: sha256_file(directory / name) for name in files}
        spec = getattr(self.tokenizer, "spec", None)
        (directory / self.META).write_text(json.dumps({"files": sums, "n": len(self),
                                                       "tokenizer": spec}, indent=1))
        return sums

    @classmethod
    def load(cls, store_dir: str | Path, use_faiss: bool | None = None,
             tokenizer: Any = None) -> Retriever:
        """The retriever saved in a store directory (checksums verified; its memory count
        checked against the store's manifest when the directory holds one); its tokenizer is
        the one it was built with, unless given."""
        store_dir = Path(store_dir)
        directory = store_dir / RETRIEVER_DIR
        meta_file = directory / cls.META
        try:
            meta = json.loads(meta_file.read_text())
            files = meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExplicitStoreError(f"{meta_file}: missing or unreadable ({e})") from e
        for name, digest in files.items():
            if sha256_file(directory / name) != digest:
                raise ExplicitStoreError(f"{directory / name}: checksum mismatch (corrupt or "
                                         "modified)")
        try:
            embedder = load_embedder(directory / cls.EMBEDDER)
            embeddings = np.load(directory / cls.EMBEDDINGS)
        except (OSError, ValueError) as e:
            raise ExplicitStoreError(f"{directory}: cannot load the retriever ({e})") from e
        if embeddings.ndim != 2 or embeddings.shape != (meta.get("n"), embedder.dim):
            raise ExplicitStoreError(f"{directory / cls.EMBEDDINGS}: shape {embeddings.shape},"
                                     f" expected ({meta.get('n')}, {embedder.dim})")
        spec = meta.get("tokenizer")
        manifest = store_dir / BANK_MANIFEST
        if manifest.is_file():  # a whole store, not a copy of its retriever/ alone
            try:
                store_meta = json.loads(manifest.read_text())["source"]["explicit"]
                spec, n_memories = store_meta["tokenizer"], store_meta["n_memories"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ExplicitStoreError(f"{manifest}: no source.explicit description ({e})"
                                         ) from e
            if embeddings.shape[0] != n_memories:
                raise ExplicitStoreError(f"{meta_file}: indexes {embeddings.shape[0]} memories,"
                                         f" {manifest} holds {n_memories} (mismatched manifest)")
        if tokenizer is None and spec is not None:
            tokenizer = load_tokenizer(spec)
        return cls(embedder, embeddings, tokenizer, use_faiss)

    def search(self, queries: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [n, r] of the r best memories for each query embedding, best first."""
        if not 1 <= r <= len(self):
            raise ValueError(f"r={r}: must lie in [1, {len(self)}] (memories in the store)")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._index is None:
            return self._exact_search(queries, r)
        # ask for a few more so that ties at the cut are resolved by id, as numpy does
        scores, ids = self._index.search(queries, min(len(self), r + 8))
        order = np.lexsort((ids, -scores), axis=-1)[:, :r]
        return (np.take_along_axis(scores, order, -1),
                np.take_along_axis(ids, order, -1).astype(np.int64))

    def _exact_search(self, queries: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocks of queries (at most SCORE_BLOCK scores at a time); per query, the memories
        scoring at least its r-th best score, sorted by (score desc, id)."""
        n, total = len(queries), len(self)
        out_scores = np.empty((n, r), dtype=np.float32)
        out_ids = np.empty((n, r), dtype=np.int64)
        step = max(1, self.SCORE_BLOCK // total)
        for start in range(0, n, step):
            scores = queries[start:start + step] @ self.embeddings.T
            kth = np.partition(scores, total - r, axis=1)[:, total - r]
            for row, (line, cut) in enumerate(zip(scores, kth)):
                cand = np.flatnonzero(line >= cut)
                best = cand[np.lexsort((cand, -line[cand]))[:r]]
                out_scores[start + row], out_ids[start + row] = line[best], best
        return out_scores, out_ids

    def retrieve(self, chunks: Sequence[Sequence[int]] | Sequence[str], r: int) -> torch.Tensor:
        """Top-``r`` memory ids int64 [n_chunks, r] for chunks given as token lists (decoded
        with the tokenizer) or texts."""
        texts = [c if isinstance(c, str) else self._decode(c) for c in chunks]
        if not texts:
            return torch.zeros(0, r, dtype=torch.long)
        return torch.from_numpy(self.search(self.embedder.embed(texts), r)[1].copy())

    def _decode(self, tokens: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("token chunks need a tokenizer (Retriever.load reads the store's)")
        return self.tokenizer.decode([int(t) for t in tokens])


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
    meta = ExplicitStore.open(store, verify=True).manifest  # a batch job: check every file
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
