"""Explicit-memory stores (Memory^3, DESIGN §6, §11): the on-disk format, its codecs, and
:class:`ExplicitStore`, which reads memories by id.

A memory is one reference chunk's kept K and V, ``[n_mem_layers, n_kv_heads, m, head_dim]``
each (the selection is :mod:`memtron.model.memory.explicit`). A store is a directory holding a
bank in the format of :mod:`memtron.storage.bank`, so it is memory-mapped locally or served by
``memtron serve-memory``::

    manifest.json            bank manifest (sha256 per block file); source.explicit = the meta
    memories-*.safetensors   table "memories": one row per memory = concat(K, V) flattened,
                             encoded by the store dtype (bf16 | int8 | pq, see the codecs)
    positions-*.safetensors  table "positions" int16 [N, n_layers*kv*m]: the kept tokens'
                             positions in their reference
    spans-*.safetensors      table "spans" int64 [N, 3]: (document index, char start, char end)
    explicit_meta-*          table "explicit_meta" uint8 [1, n]: the meta as JSON, so a client
                             of a memory server reads the same description as a local reader
    codebooks-*              table "codebooks" float32 (pq only)
    references.jsonl         per source document: its id and its memories' id range
    retriever/               chunk embeddings + the embedder that made them
                             (:class:`memtron.data.retrieve.Retriever`)

Memory ids are row numbers. :class:`ExplicitStore` fetches and decodes memories by id (LRU cache
of decoded rows). PQ codebooks are fitted by :func:`memtron.data.quantize.train_pq`.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

from memtron.config import ModelConfig, architecture_keys
from memtron.storage.bank import open_bank
from memtron.storage.manifest import sha256_file
from memtron.storage.rowblock import BANK_MANIFEST, BankError
from memtron.storage.store import HttpBank, RowStore

STORE_FORMAT = "memtron-explicit-store"
STORE_VERSION = 1
MEMORIES, POSITIONS, SPANS, META, CODEBOOKS = (
    "memories", "positions", "spans", "explicit_meta", "codebooks")
REFERENCES_FILE = "references.jsonl"
RETRIEVER_DIR = "retriever"
STORE_DTYPES = ("bf16", "int8", "pq")
PQ_CENTROIDS = 256  # one uint8 code per sub-vector
FINGERPRINT_KEYS = architecture_keys(ModelConfig)  # what K/V depend on


class ExplicitStoreError(BankError):
    """An explicit-memory store is missing, corrupt, inconsistent, or was built by another
    model; the message names the file (or URL) and the mismatch."""


# --------------------------------------------------------------------------- codecs


@dataclass(frozen=True)
class Layout:
    """Shape of one memory: K and V [n_layers, n_kv_heads, m, head_dim] each."""

    n_layers: int
    n_kv_heads: int
    m: int
    head_dim: int

    @property
    def n_vectors(self) -> int:
        """head_dim-vectors in one row (K and V)."""
        return 2 * self.n_layers * self.n_kv_heads * self.m

    @property
    def n_groups(self) -> int:
        """(K|V, layer, KV head) groups; PQ trains one codebook set per group."""
        return 2 * self.n_layers * self.n_kv_heads

    def split(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, n_vectors, D] -> k, v [n, n_layers, KV, m, D]."""
        kv = vectors.view(-1, 2, self.n_layers, self.n_kv_heads, self.m, self.head_dim)
        return kv[:, 0], kv[:, 1]


class Codec:
    """Encodes memories [n, n_vectors, head_dim] (fp32) as store rows and back."""

    name = ""
    row_dtype: torch.dtype

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def row_dim(self) -> int:
        raise NotImplementedError

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Bf16Codec(Codec):
    """Rows are the bf16 values: exact for bf16 K/V, and what attention runs on."""

    name, row_dtype = "bf16", torch.bfloat16

    def row_dim(self) -> int:
        return self.layout.n_vectors * self.layout.head_dim

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.to(torch.bfloat16).reshape(vectors.shape[0], -1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.float().view(rows.shape[0], self.layout.n_vectors, self.layout.head_dim)


class Int8Codec(Codec):
    """Per-vector absmax int8: each head_dim vector stores int8 values and one fp16 scale
    ``s = absmax / 127``; a row is the uint8 bytes of the values, then of the scales. Error per
    element at most ``s / 2`` (half a quantisation step), i.e. 0.4% of the vector's absmax."""

    name, row_dtype = "int8", torch.uint8

    def row_dim(self) -> int:
        return self.layout.n_vectors * (self.layout.head_dim + 2)

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = vectors.float()
        scale = (vectors.abs().amax(-1) / 127).to(torch.float16)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        values = (vectors / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
        n = vectors.shape[0]
        return torch.cat([values.reshape(n, -1).view(torch.uint8),
                          scale.reshape(n, -1).view(torch.uint8)], dim=1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        n, nv, d = rows.shape[0], self.layout.n_vectors, self.layout.head_dim
        values = rows[:, : nv * d].contiguous().view(torch.int8).view(n, nv, d)
        scale = rows[:, nv * d:].contiguous().view(torch.float16).view(n, nv, 1)
        return values.float() * scale.float()


class PQCodec(Codec):
    """Product quantisation: each head_dim vector is cut into sub-vectors of ``sub_dim``; each
    sub-vector is replaced by the uint8 id of its nearest centroid among 256 learnt by k-means
    per (K|V, layer, KV head, sub-space). Rows hold ``n_vectors * head_dim / sub_dim`` bytes
    (sub_dim=4: 8x smaller than bf16); codebooks [n_groups, n_sub, 256, sub_dim] fp32."""

    name, row_dtype = "pq", torch.uint8

    def __init__(self, layout: Layout, sub_dim: int, codebooks: torch.Tensor | None = None
                 ) -> None:
        super().__init__(layout)
        if sub_dim < 1 or layout.head_dim % sub_dim:
            raise ValueError(f"pq sub_dim {sub_dim} must divide head_dim {layout.head_dim}")
        self.sub_dim, self.n_sub = sub_dim, layout.head_dim // sub_dim
        self.codebooks = codebooks

    def row_dim(self) -> int:
        return self.layout.n_vectors * self.n_sub

    def grouped(self, vectors: torch.Tensor) -> torch.Tensor:
        """[n, n_vectors, D] -> [n_groups, n * m, n_sub, sub_dim] (vector v is in group v//m)."""
        lay = self.layout
        x = vectors.float().reshape(-1, lay.n_groups, lay.m, self.n_sub, self.sub_dim)
        return x.transpose(0, 1).reshape(lay.n_groups, -1, self.n_sub, self.sub_dim)

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.codebooks is None:
            raise RuntimeError("PQCodec.encode without codebooks (fit them with "
                               "memtron.data.quantize.train_pq)")
        n, lay = vectors.shape[0], self.layout
        x = self.grouped(vectors)  # [G, n*m, S, d]
        books = self.codebooks  # [G, S, C, d]
        dist = ((x * x).sum(-1)[..., None] - 2 * torch.einsum("gnsd,gscd->gnsc", x, books)
                + (books * books).sum(-1)[:, None])
        codes = dist.argmin(-1).to(torch.uint8)  # [G, n*m, S]
        codes = codes.view(lay.n_groups, n, lay.m, self.n_sub).transpose(0, 1)
        return codes.reshape(n, -1).contiguous()

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        if self.codebooks is None:
            raise RuntimeError("PQCodec.decode without codebooks")
        n, lay = rows.shape[0], self.layout
        codes = rows.view(n, lay.n_groups, lay.m, self.n_sub).long()
        g = torch.arange(lay.n_groups)[None, :, None, None]
        s = torch.arange(self.n_sub)[None, None, None, :]
        sub = self.codebooks[g, s, codes]  # [n, G, m, S, d]
        return sub.reshape(n, lay.n_vectors, lay.head_dim)



def make_codec(meta: dict[str, Any], codebooks: torch.Tensor | None = None) -> Codec:
    """The codec a store's meta describes."""
    layout = Layout(len(meta["layers"]), meta["n_kv_heads"], meta["m"], meta["head_dim"])
    if meta["dtype"] == "bf16":
        return Bf16Codec(layout)
    if meta["dtype"] == "int8":
        return Int8Codec(layout)
    if meta["dtype"] == "pq":
        return PQCodec(layout, meta["pq_sub_dim"], codebooks)
    raise ValueError(f"unknown store dtype {meta['dtype']!r} (expected one of {STORE_DTYPES})")


# --------------------------------------------------------------------------- model identity


def model_fields(model_cfg: Any) -> dict[str, Any]:
    """The architecture fields of a ModelConfig (or of a Config's ``model``, or a dict)."""
    cfg = getattr(model_cfg, "model", model_cfg)
    raw = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    return {key: raw[key] for key in FINGERPRINT_KEYS if key in raw}


def model_fingerprint(model_cfg: Any) -> str:
    """sha256 of the architecture fields: two models whose K/V could differ in shape or
    meaning have different fingerprints."""
    text = json.dumps(model_fields(model_cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- store


class ExplicitStore:
    """Memories by id from a store directory (memory-mapped) or a memory server URL, decoded to
    ``dtype`` (the model's, by default), with an LRU cache of ``cache_rows`` decoded memories
    (a drive without a RAM cache cost Memory^3 35% of decode speed)."""

    def __init__(self, where: str, meta: dict[str, Any], rows: RowStore,
                 positions: RowStore, spans: RowStore, codec: Codec, cache_rows: int = 0,
                 dtype: torch.dtype | None = None) -> None:
        self.where, self.meta, self.codec = where, meta, codec
        self.rows, self.position_rows, self.span_rows = rows, positions, spans
        self.dtype = dtype or getattr(torch, meta["model_dtype"])
        self.cache_rows = cache_rows
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        # one fetch at a time: a prefetching thread and the main thread may share a store, and
        # neither the LRU nor an HTTP session is safe to use from two threads at once
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "memories": 0, "cache_hits": 0, "rows_fetched": 0,
                      "bytes_fetched": 0}

    @classmethod
    def open(cls, path_or_url: str | Path, cache_rows: int = 0,
             dtype: torch.dtype | None = None, verify: bool = False,
             token: str | None = None) -> ExplicitStore:
        """Open a store directory or ``http(s)://`` memory server; ``verify`` checks every
        block file's sha256 (local stores). Sizes, headers and the manifest are always
        checked; problems raise :class:`ExplicitStoreError` naming the file."""
        where = str(path_or_url)
        if where.startswith(("http://", "https://")):
            bank: Any = HttpBank(where, token=token)
            manifest_name = f"{where} (memory server)"
        else:
            try:
                bank = open_bank(Path(where))
            except ExplicitStoreError:
                raise
            except BankError as e:
                raise ExplicitStoreError(str(e)) from e
            manifest_name = str(Path(where) / BANK_MANIFEST)
            if verify:
                try:
                    bank.verify()
                except BankError as e:
                    raise ExplicitStoreError(str(e)) from e
                for name, digest in bank.manifest.get("source", {}).get("files", {}).items():
                    file = Path(where) / name
                    if not file.is_file() or sha256_file(file) != digest:
                        raise ExplicitStoreError(f"{file}: missing or checksum mismatch "
                                                 "(corrupt or modified)")
        missing = [t for t in (MEMORIES, POSITIONS, SPANS, META) if t not in bank.tables]
        if missing:
            raise ExplicitStoreError(f"{manifest_name}: not an explicit-memory store (no "
                                     f"table {', '.join(missing)})")
        meta_store = bank.table(META)
        try:
            meta = json.loads(bytes(meta_store.fetch(torch.zeros(1, dtype=torch.long))
                                    .view(-1).numpy()).decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ExplicitStoreError(f"{manifest_name}: table {META} is not valid JSON ({e})"
                                     ) from e
        _check_meta(meta, manifest_name)
        if not isinstance(bank, HttpBank):
            source = bank.manifest.get("source", {}).get("explicit")
            if source != meta:
                raise ExplicitStoreError(f"{manifest_name}: source.explicit disagrees with "
                                         f"table {META} (mismatched manifest)")
        codebooks = None
        if meta["dtype"] == "pq":
            if CODEBOOKS not in bank.tables:
                raise ExplicitStoreError(f"{manifest_name}: pq store without table {CODEBOOKS}")
            books = bank.table(CODEBOOKS)
            codebooks = books.fetch(torch.arange(books.n_rows)).float()
        codec = make_codec(meta, None)
        if isinstance(codec, PQCodec):
            lay = codec.layout
            shape = (lay.n_groups, codec.n_sub, PQ_CENTROIDS, codec.sub_dim)
            if codebooks is None or codebooks.numel() != math.prod(shape):
                raise ExplicitStoreError(f"{manifest_name}: table {CODEBOOKS} does not hold "
                                         f"codebooks {list(shape)}")
            codec.codebooks = codebooks.reshape(shape)
        n = meta["n_memories"]
        lay = codec.layout
        rows, positions, spans = bank.table(MEMORIES), bank.table(POSITIONS), bank.table(SPANS)
        for name, store, dim, dt in [
                (MEMORIES, rows, codec.row_dim(), codec.row_dtype),
                (POSITIONS, positions, lay.n_vectors // 2, torch.int16),
                (SPANS, spans, 3, torch.int64)]:
            if (store.n_rows, store.dim, store.dtype) != (n, dim, dt):
                raise ExplicitStoreError(
                    f"{manifest_name}: table {name} is {store.dtype} [{store.n_rows}, "
                    f"{store.dim}], the store's meta needs {dt} [{n}, {dim}] (mismatched "
                    "manifest)")
        return cls(where, meta, rows, positions, spans, codec, cache_rows, dtype)

    @property
    def manifest(self) -> dict[str, Any]:
        """layers, n_kv_heads, head_dim, m, ref_len, dtype (storage), model_dtype, model
        fingerprint and fields, n_memories, checkpoint, step, tokenizer."""
        return self.meta

    def __len__(self) -> int:
        return self.meta["n_memories"]

    def check_model(self, model_cfg: Any) -> None:
        """Refuse a model other than the one that built this store, naming the mismatch: its
        memories would be K/V of another function, of the wrong shape, or for absent layers."""
        fields = model_fields(model_cfg)
        built = self.meta["model"]
        problems = [f"{key}: store built with {built.get(key)!r}, model has {fields[key]!r}"
                    for key in fields if built.get(key) != fields[key]]
        if not problems:
            head_dim = fields["d_model"] // fields["n_heads"]
            if head_dim != self.meta["head_dim"]:
                problems.append(f"head_dim: store {self.meta['head_dim']}, model {head_dim}")
            if fields["n_kv_heads"] != self.meta["n_kv_heads"]:
                problems.append(f"n_kv_heads: store {self.meta['n_kv_heads']}, model "
                                f"{fields['n_kv_heads']}")
            out = [layer for layer in self.meta["layers"] if layer >= fields["n_layers"]]
            if out:
                problems.append(f"layers {out} do not exist in a {fields['n_layers']}-layer "
                                "model")
        if problems:
            raise ExplicitStoreError(f"{self.where}: built by a different model (fingerprint "
                                     f"{self.meta['fingerprint']}, model "
                                     f"{model_fingerprint(model_cfg)}): " + "; ".join(problems))

    def _decoded(self, ids: torch.Tensor) -> torch.Tensor:
        """Decoded vectors [n, n_vectors, D] (in ``dtype``) for unique CPU ids."""
        rows = self.rows.fetch(ids)
        self.stats["rows_fetched"] += ids.numel()
        self.stats["bytes_fetched"] += rows.numel() * rows.element_size()
        return self.codec.decode(rows).to(self.dtype)

    def fetch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [n, n_layers, KV, m, D] in ``dtype`` (CPU) for ``ids`` int64 [n] (any order,
        repeats allowed); deduplicates, serves hits from the LRU cache. Thread-safe."""
        with self._lock:
            return self._fetch(ids)

    def _fetch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ids.reshape(-1).to(device="cpu", dtype=torch.long)
        n_mem = len(self)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_mem):
            raise IndexError(f"{self.where}: memory ids must lie in [0, {n_mem})")
        unique, inverse = torch.unique(ids, return_inverse=True)
        lay = self.codec.layout
        out = torch.empty(unique.numel(), lay.n_vectors, lay.head_dim, dtype=self.dtype)
        if self.cache_rows > 0:
            missing = []
            for slot, key in enumerate(unique.tolist()):
                hit = self._cache.get(key)
                if hit is None:
                    missing.append(slot)
                else:
                    self._cache.move_to_end(key)
                    out[slot] = hit
            self.stats["cache_hits"] += unique.numel() - len(missing)
            if missing:
                slots = torch.tensor(missing, dtype=torch.long)
                fresh = self._decoded(unique[slots])
                out[slots] = fresh
                for key, row in zip(unique[slots].tolist(), fresh):
                    self._cache[key] = row.clone()
                while len(self._cache) > self.cache_rows:
                    self._cache.popitem(last=False)
        elif unique.numel():
            out = self._decoded(unique)
        self.stats["requests"] += 1
        self.stats["memories"] += ids.numel()
        return lay.split(out[inverse])

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Positions [n, n_layers, KV, m] int64 of the kept tokens in their references."""
        lay = self.codec.layout
        with self._lock:
            rows = self.position_rows.fetch(ids.reshape(-1))
        return rows.long().view(-1, lay.n_layers, lay.n_kv_heads, lay.m)

    def spans(self, ids: torch.Tensor) -> torch.Tensor:
        """(document index, char start, char end) [n, 3] of each memory's reference text."""
        with self._lock:
            return self.span_rows.fetch(ids.reshape(-1))


def _check_meta(meta: Any, where: str) -> None:
    fields = {"format": str, "version": int, "layers": list, "n_kv_heads": int, "head_dim": int,
              "m": int, "ref_len": int, "dtype": str, "model_dtype": str, "fingerprint": str,
              "model": dict, "n_memories": int}
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise ExplicitStoreError(f"{where}: not a {STORE_FORMAT} description")
    if meta.get("version") != STORE_VERSION:
        raise ExplicitStoreError(f"{where}: store version {meta.get('version')!r}, this "
                                 f"memtron reads {STORE_VERSION}")
    bad = [k for k, t in fields.items() if not isinstance(meta.get(k), t)]
    if bad:
        raise ExplicitStoreError(f"{where}: store description lacks or mistypes {bad}")
    if meta["dtype"] not in STORE_DTYPES:
        raise ExplicitStoreError(f"{where}: store dtype {meta['dtype']!r} is not one of "
                                 f"{STORE_DTYPES}")
