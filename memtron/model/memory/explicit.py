"""Memory^3 explicit memories: build, store, retrieve (DESIGN §6, §11).

A *memory* is one reference chunk (at most ``ref_len`` tokens) encoded by the model itself at
positions ``0..ref_len-1``. In every memory layer and for every KV head, the ``m`` tokens that
receive the most attention (summed over all query tokens and over the query heads of the KV
group, softmax without a causal mask, after RoPE) are kept, with their post-RoPE keys and their
values: a memory is ``K, V [n_mem_layers, n_kv_heads, m, head_dim]``, about ``m / ref_len`` of
the dense KV of its chunk.

Store (a directory; a bank in the format of :mod:`memtron.storage.bank`, so it is memory-mapped
locally or served by ``memtron serve-memory``)::

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
    retriever/               chunk embeddings + the embedder that made them (Retriever)

Memory ids are row numbers. :class:`ExplicitStore` fetches and decodes memories by id (LRU cache
of decoded rows); :class:`Retriever` maps text chunks to memory ids by embedding similarity
(``faiss`` IndexFlatIP when installed, exact numpy otherwise: same ids).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
FINGERPRINT_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                    "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings")


class ExplicitStoreError(BankError):
    """An explicit-memory store is missing, corrupt, inconsistent, or was built by another
    model; the message names the file (or URL) and the mismatch."""


# --------------------------------------------------------------------------- selection


def attention_received(q: torch.Tensor, k: torch.Tensor,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each key token receives: q [B, H, L, D], k [B, KV, L, D] (post-RoPE) ->
    [B, KV, L] fp32, ``Σ_i Σ_{h in group} softmax_j(q_i·k_j/√D)`` with no causal mask.
    ``valid`` [B, L] bool marks real tokens (False = padding): padding keys get no attention and
    padding queries give none."""
    b, n_heads, length, dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    qg = q.float().view(b, n_kv, group, length, dim)
    scores = torch.einsum("bkgid,bkjd->bkgij", qg, k.float()) / math.sqrt(dim)
    if valid is not None:
        valid = valid.to(q.device)
        scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
        probs = scores.softmax(-1) * valid[:, None, None, :, None]
    else:
        probs = scores.softmax(-1)
    return probs.sum(dim=(2, 3))


def select_top_tokens(q: torch.Tensor, k: torch.Tensor, m: int,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, KV, m] int64 (ascending) of the ``m`` tokens receiving the most attention
    per KV head (:func:`attention_received`). A reference with fewer than ``m`` real tokens
    repeats its best tokens to fill the ``m`` slots (a store row has a fixed size)."""
    received = attention_received(q, k, valid)
    length = received.shape[-1]
    if valid is not None:  # padding ranks below every real token
        received = received.masked_fill(~valid.to(received.device)[:, None, :], -1.0)
    order = received.argsort(dim=-1, descending=True, stable=True)  # real tokens first
    if valid is None:
        n_real = torch.full((order.shape[0], 1, 1), length, device=order.device)
    else:
        n_real = valid.to(order.device).sum(-1).clamp_min(1)[:, None, None]
    slot = torch.arange(m, device=order.device)[None, None, :] % n_real  # [B, 1, m]
    top = torch.gather(order, -1, slot.expand(order.shape[0], order.shape[1], m))
    return top.sort(dim=-1).values


class _StopForward(Exception):
    """Raised by the capture hook after the last memory layer: deeper layers are not needed."""


def pad_references(batch: Sequence[Sequence[int]] | torch.Tensor,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad token lists into tokens [B, L] on ``device`` and valid [B, L] (None when
    nothing is padded); a tensor passes through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device=device, dtype=torch.long), None
    lengths = [len(t) for t in batch]
    if not lengths or min(lengths) < 1:
        raise ValueError("every reference needs at least one token")
    tokens = torch.zeros(len(batch), max(lengths), dtype=torch.long)
    for row, ids in enumerate(batch):
        tokens[row, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return tokens.to(device), (None if bool(valid.all()) else valid.to(device))


@torch.no_grad()
def encode_batch(model: nn.Module, tokens: torch.Tensor, layers: Sequence[int], m: int,
                 valid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of references tokens [B, L] (right-padded where ``valid`` is False) ->
    k, v [B, n_layers, KV, m, D] and positions [B, n_layers, KV, m]. Padding at the end never
    changes the real tokens of a causal model, so the batch is one ordinary forward (positions
    0..L-1), stopped after the deepest memory layer."""
    layers = list(layers)
    blocks = model.blocks
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    last = max(layers)
    handles = []

    def hook(index: int):
        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            rope = args[1] if len(args) > 1 else kwargs["rope"]
            q, k, v = module.rotated_qkv(x, rope)
            top = select_top_tokens(q, k, m, valid)  # [B, KV, m]
            index_d = top[..., None].expand(*top.shape, k.shape[-1])
            captured[index] = (k.gather(2, index_d), v.gather(2, index_d), top)
            if index == last:
                raise _StopForward
        return capture

    for layer in layers:
        handles.append(blocks[layer].attn.register_forward_pre_hook(hook(layer),
                                                                     with_kwargs=True))
    try:
        model(tokens)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    k = torch.stack([captured[layer][0] for layer in layers], dim=1)
    v = torch.stack([captured[layer][1] for layer in layers], dim=1)
    positions = torch.stack([captured[layer][2] for layer in layers], dim=1)
    return k, v, positions


def encode_references(model: nn.Module,
                      token_batches: Iterable[Sequence[Sequence[int]] | torch.Tensor],
                      layers: Sequence[int], m: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode references (batches of token lists, or [B, L] tensors) with ``model`` and keep
    the top-``m`` tokens per (memory layer, KV head): k, v [N, n_layers, KV, m, D] (post-RoPE
    K, on the model's device and in its compute dtype) and positions [N, n_layers, KV, m]."""
    if not layers:
        raise ValueError("encode_references: no memory layers given")
    n_blocks = len(model.blocks)
    bad = [layer for layer in layers if not 0 <= layer < n_blocks]
    if bad:
        raise ValueError(f"memory layers {bad} out of range for a model of {n_blocks} layers")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    device = next(model.parameters()).device
    ks, vs, ps = [], [], []
    for batch in token_batches:
        tokens, valid = pad_references(batch, device)
        k, v, pos = encode_batch(model, tokens, layers, m, valid)
        ks.append(k)
        vs.append(v)
        ps.append(pos)
    if not ks:
        raise ValueError("encode_references: no references given")
    return torch.cat(ks), torch.cat(vs), torch.cat(ps)


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

    def _grouped(self, vectors: torch.Tensor) -> torch.Tensor:
        """[n, n_vectors, D] -> [n_groups, n * m, n_sub, sub_dim] (vector v is in group v//m)."""
        lay = self.layout
        x = vectors.float().reshape(-1, lay.n_groups, lay.m, self.n_sub, self.sub_dim)
        return x.transpose(0, 1).reshape(lay.n_groups, -1, self.n_sub, self.sub_dim)

    def train(self, vectors: torch.Tensor, iters: int = 20, seed: int = 0) -> torch.Tensor:
        """Fit the codebooks on a sample of memories [n, n_vectors, D] (numpy k-means)."""
        grouped = self._grouped(vectors).numpy()
        rng = np.random.default_rng(seed)
        books = np.zeros((self.layout.n_groups, self.n_sub, PQ_CENTROIDS, self.sub_dim),
                         dtype=np.float32)
        for g in range(self.layout.n_groups):
            for s in range(self.n_sub):
                books[g, s] = kmeans(grouped[g, :, s], PQ_CENTROIDS, iters, rng)
        self.codebooks = torch.from_numpy(books)
        return self.codebooks

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.codebooks is None:
            raise RuntimeError("PQCodec.encode before train(): no codebooks")
        n, lay = vectors.shape[0], self.layout
        x = self._grouped(vectors)  # [G, n*m, S, d]
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


def kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Centroids [k, d] of points x [n, d] by Lloyd's algorithm. With at most k distinct points
    the centroids are those points (PQ is then exact); spare centroids repeat a point."""
    x = x.astype(np.float32)
    distinct = np.unique(x, axis=0)
    if len(distinct) <= k:
        return distinct[np.arange(k) % len(distinct)]
    centroids = distinct[rng.choice(len(distinct), k, replace=False)].copy()
    x_sq = (x * x).sum(1)[:, None]
    for _ in range(iters):
        dist = x_sq - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
        assign = dist.argmin(1)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        empty = counts == 0
        centroids[~empty] = sums[~empty] / counts[~empty, None]
        if empty.any():  # re-seed empty clusters at the worst-served points
            worst = dist[np.arange(len(x)), assign].argsort()[::-1][: int(empty.sum())]
            centroids[empty] = x[worst]
    return centroids


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


def default_layers(n_layers: int) -> list[int]:
    """The first half of the layers (Memory^3's memory layers), at least one."""
    return list(range(max(1, n_layers // 2)))


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


# --------------------------------------------------------------------------- retriever


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
        from memtron.data.embed import HashedNgramEmbedder, make_embedder

        emb = make_embedder(embedder, dim)
        if isinstance(emb, HashedNgramEmbedder):
            emb.fit(texts)
        return cls(emb, emb.embed(list(texts)), tokenizer)

    def save(self, directory: str | Path) -> dict[str, str]:
        """Write the embedder and the embeddings; returns {file name: sha256}."""
        from memtron.data.embed import save_embedder

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
        from memtron.data.embed import load_embedder
        from memtron.data.tokenizer import load_tokenizer

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
