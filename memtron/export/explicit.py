"""Checkpoint + reference corpus -> explicit-memory store (``memtron memory build-explicit``).

References (.jsonl with a ``text`` field and an optional ``id``; .txt paragraphs; .parquet) are
tokenised with the checkpoint's tokenizer and each document is cut into balanced chunks of at
most ``ref_len`` tokens (a 130-token document gives two of 65, not 128 + 2). Each chunk becomes
one memory (:mod:`memtron.model.memory.explicit`; the store format is
:mod:`memtron.storage.explicit`). ``workers`` processes each load the model and
encode a contiguous slice of the chunks into their own row-block files; the manifest lists the
parts' blocks in order, so nothing is copied to merge them. PQ codebooks are fitted first, on
the encodings of an evenly spaced sample of chunks, so every worker quantises with the same ones.
The store is written under a temporary sibling directory and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtron.data.jsonl import jsonl_rows
from memtron.data.prepare import iter_documents
from memtron.data.quantize import train_pq
from memtron.data.retrieve import Retriever
from memtron.data.shards import building_dir
from memtron.data.tokenizer import Tokenizer, load_tokenizer
from memtron.model.memory.explicit import default_layers, encode_batch, pad_references
from memtron.storage.bank import DEFAULT_BLOCK_BYTES, TableRows, write_bank
from memtron.storage.checkpoint import CheckpointReader
from memtron.storage.explicit import (
    CODEBOOKS,
    MEMORIES,
    META,
    POSITIONS,
    PQ_CENTROIDS,
    REFERENCES_FILE,
    RETRIEVER_DIR,
    SPANS,
    STORE_DTYPES,
    STORE_FORMAT,
    STORE_VERSION,
    Codec,
    ExplicitStoreError,
    PQCodec,
    make_codec,
    model_fields,
    model_fingerprint,
)
from memtron.storage.manifest import resolve_checkpoint, sha256_file
from memtron.storage.rowblock import BANK_FORMAT, BANK_MANIFEST, BANK_VERSION

MAX_REF_LEN = 32767  # positions are stored as int16
PROGRESS_S = 5.0  # seconds between progress lines of a worker


@dataclass
class Chunk:
    """One reference chunk: its document, its tokens and its characters in the document."""

    doc: int
    tokens: np.ndarray  # int32: a fifth of the memory of a list of Python ints
    char_start: int
    char_end: int
    text: str


def chunk_bounds(n_tokens: int, ref_len: int) -> list[tuple[int, int]]:
    """Balanced cuts of ``n_tokens`` into ceil(n / ref_len) chunks of at most ``ref_len``."""
    n_chunks = max(1, math.ceil(n_tokens / ref_len))
    cuts = [round(i * n_tokens / n_chunks) for i in range(n_chunks + 1)]
    return list(zip(cuts, cuts[1:]))


def _documents(path: Path, text_key: str) -> Iterator[tuple[Any, str]]:
    """(id, text) per document; ids are the jsonl ``id`` field or the document's index."""
    if path.suffix.lower() == ".jsonl":
        for index, (line_no, row) in enumerate(jsonl_rows(path)):
            if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                raise ValueError(f"{path}:{line_no}: no string field {text_key!r}")
            yield row.get("id", index), row[text_key]
    else:
        yield from enumerate(iter_documents(path, text_key))


def read_references(path: str | Path, tokenizer: Tokenizer, ref_len: int,
                    text_key: str = "text") -> tuple[list[Chunk], list[dict[str, Any]]]:
    """Chunks of every non-empty document, and per document {doc, id, first, n_chunks}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference file does not exist")
    chunks: list[Chunk] = []
    docs: list[dict[str, Any]] = []
    for doc_id, text in _documents(path, text_key):
        tokens = tokenizer.encode(text)
        if not tokens:
            continue
        doc = len(docs)
        docs.append({"doc": doc, "id": doc_id, "first": len(chunks)})
        for start, end in chunk_bounds(len(tokens), ref_len):
            char_start = len(tokenizer.decode(tokens[:start])) if start else 0
            chunk_text = tokenizer.decode(tokens[start:end])
            chunks.append(Chunk(doc, np.asarray(tokens[start:end], dtype=np.int32), char_start,
                                char_start + len(chunk_text), chunk_text))
        docs[-1]["n_chunks"] = len(chunks) - docs[-1]["first"]
    if not chunks:
        raise ValueError(f"{path}: no non-empty reference documents")
    return chunks, docs


def _batches(chunks: Sequence[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
    for start in range(0, len(chunks), batch_size):
        yield list(chunks[start:start + batch_size])


def _encode_vectors(model: torch.nn.Module, batch: list[np.ndarray], layers: list[int], m: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch -> (vectors [B, n_vectors, D] fp32 on CPU, positions [B, n_layers*KV*m])."""
    device = next(model.parameters()).device
    tokens, valid = pad_references(batch, device)
    k, v, pos = encode_batch(model, tokens, layers, m, valid)
    vectors = torch.stack([k, v], dim=1).float().cpu()
    return vectors.reshape(len(batch), -1, k.shape[-1]), pos.reshape(len(batch), -1).cpu()


@dataclass
class _PartJob:
    ckpt: str
    device: str
    chunks: list[np.ndarray]
    layers: list[int]
    m: int
    meta: dict[str, Any]
    codebooks: torch.Tensor | None
    batch_size: int
    out: str
    index: int
    threads: int
    block_bytes: int
    progress: bool


def _encode_part(job: _PartJob) -> dict[str, Any]:
    """Encode one slice of chunks into a bank at ``job.out`` (runs in a worker process or in
    this one); returns the bank's manifest."""
    from memtron.infer.model import load_model

    if job.threads:
        torch.set_num_threads(job.threads)
    model = load_model(job.ckpt, device=job.device).model
    codec = make_codec(job.meta, job.codebooks)
    n, width = len(job.chunks), codec.layout.n_vectors // 2
    # Positions are written after the memories (a bank writes its tables in turn): they wait
    # in a file next to the part, not in RAM.
    Path(job.out).parent.mkdir(parents=True, exist_ok=True)
    spill = Path(f"{job.out}.positions.npy")
    positions = np.lib.format.open_memmap(spill, mode="w+", dtype=np.int16, shape=(n, width))
    started = last = time.perf_counter()
    done = 0

    def rows() -> Iterator[torch.Tensor]:
        nonlocal done, last
        for batch in _batches(job.chunks, job.batch_size):
            vectors, pos = _encode_vectors(model, batch, job.layers, job.m)
            positions[done:done + len(batch)] = pos.numpy()
            done += len(batch)
            now = time.perf_counter()
            if job.progress and (now - last >= PROGRESS_S or done == n):
                last = now
                print(f"  part {job.index}: {done:,}/{n:,} references "
                      f"({done / max(now - started, 1e-9):,.1f}/s)", file=sys.stderr, flush=True)
            yield codec.encode(vectors)

    def position_rows() -> Iterator[torch.Tensor]:
        for start in range(0, n, job.batch_size):
            yield torch.from_numpy(np.array(positions[start:start + job.batch_size]))

    tables = {MEMORIES: TableRows(n, codec.row_dim(), codec.row_dtype, rows()),
              POSITIONS: TableRows(n, width, torch.int16, position_rows())}
    try:
        return write_bank(job.out, tables, block_bytes=job.block_bytes)
    finally:
        spill.unlink(missing_ok=True)  # the mapping, if still open, keeps its pages until freed


def _merge_parts(parts: list[Path], tmp: Path, source: dict[str, Any]) -> dict[str, Any]:
    """Move the parts' block files into ``tmp`` (renamed per part) and write one manifest whose
    tables list them in order (row_start shifted): the parts are never copied."""
    tables: dict[str, dict[str, Any]] = {}
    for p, part in enumerate(parts):
        manifest = json.loads((part / BANK_MANIFEST).read_text())
        for name, spec in manifest["tables"].items():
            table = tables.setdefault(name, {"n_rows": 0, "dim": spec["dim"],
                                             "dtype": spec["dtype"], "rows_per_block": 1,
                                             "blocks": []})
            for block in spec["blocks"]:
                file = f"{name}-p{p:03d}-{len(table['blocks']):05d}.safetensors"
                os.replace(part / block["file"], tmp / file)
                table["blocks"].append({**block, "file": file,
                                        "row_start": table["n_rows"] + block["row_start"]})
            table["n_rows"] += spec["n_rows"]
            table["rows_per_block"] = max(table["rows_per_block"], spec["rows_per_block"])
        shutil.rmtree(part)
    manifest = {"format": BANK_FORMAT, "version": BANK_VERSION, "tables": tables,
                "source": source}
    with open(tmp / BANK_MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def _pq_sample(n: int, size: int) -> list[int]:
    """Evenly spaced chunk indices for fitting codebooks (deterministic)."""
    if n <= size:
        return list(range(n))
    return sorted({round(i * (n - 1) / (size - 1)) for i in range(size)})


def build_explicit_store(ckpt: str | Path, references: str | Path, out: str | Path, m: int = 8,
                         ref_len: int = 128, layers: Sequence[int] | None = None,
                         dtype: str = "bf16", batch_size: int = 32, workers: int = 1,
                         device: str = "cpu", pq_sub_dim: int = 4, pq_train: int = 1024,
                         embedder: str = "hashed", embed_dim: int = 256, text_key: str = "text",
                         block_bytes: int = DEFAULT_BLOCK_BYTES, overwrite: bool = False,
                         progress: bool = True) -> dict[str, Any]:
    """Build a store at ``out`` from checkpoint ``ckpt`` and ``references`` (module doc);
    returns the bank manifest (``source.explicit`` is the store's description)."""
    from memtron.infer.model import load_model

    out = Path(out)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {STORE_DTYPES}")
    if not 1 <= ref_len <= MAX_REF_LEN or m < 1 or batch_size < 1 or workers < 1:
        raise ValueError(f"need 1 <= ref_len <= {MAX_REF_LEN}, m, batch_size and workers "
                         f">= 1 (got ref_len={ref_len}, m={m}, batch_size={batch_size}, "
                         f"workers={workers})")
    if out.exists() and not overwrite:
        raise ExplicitStoreError(f"{out}: exists (pass --overwrite to replace it)")
    path = resolve_checkpoint(Path(ckpt))
    with CheckpointReader(path) as reader:
        cfg, step = reader.config, reader.step
    mc = cfg.model
    if ref_len > mc.max_seq_len:
        raise ValueError(f"ref_len {ref_len} exceeds the model's max_seq_len {mc.max_seq_len}")
    layers = sorted(set(layers)) if layers else default_layers(mc.n_layers)
    bad = [layer for layer in layers if not 0 <= layer < mc.n_layers]
    if bad:
        raise ValueError(f"--layers {bad}: the model has layers 0..{mc.n_layers - 1}")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    t0 = time.perf_counter()
    chunks, docs = read_references(references, tokenizer, ref_len, text_key)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda _: None)
    log(f"{len(chunks):,} references of <= {ref_len} tokens from {len(docs):,} documents in "
        f"{references} ({time.perf_counter() - t0:.1f} s)")
    meta: dict[str, Any] = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "layers": layers,
        "n_kv_heads": mc.n_kv_heads, "head_dim": mc.d_model // mc.n_heads, "m": m,
        "ref_len": ref_len, "dtype": dtype, "model_dtype": "float32",
        "fingerprint": model_fingerprint(mc), "model": model_fields(mc),
        "n_memories": len(chunks), "checkpoint": str(path.resolve()), "step": step,
        "tokenizer": cfg.data.tokenizer,
        "references": str(Path(references).resolve()),
        "references_sha256": sha256_file(Path(references)),
    }
    if dtype == "pq":
        meta["pq_sub_dim"] = pq_sub_dim
    codec: Codec = make_codec(meta)
    codebooks = None
    if isinstance(codec, PQCodec):
        t0 = time.perf_counter()
        model = load_model(path, device=device).model
        sample = [chunks[i].tokens for i in _pq_sample(len(chunks), pq_train)]
        vectors = torch.cat([_encode_vectors(model, batch, layers, m)[0]
                             for batch in _batches(sample, batch_size)])
        del model
        codebooks = train_pq(codec, vectors)
        log(f"pq codebooks: {codec.layout.n_groups} groups x {codec.n_sub} sub-spaces x "
            f"{PQ_CENTROIDS} centroids of {pq_sub_dim} dims, fitted on {len(sample):,} "
            f"references ({time.perf_counter() - t0:.1f} s)")

    with building_dir(out) as tmp:
        t0 = time.perf_counter()
        n_parts = min(workers, len(chunks))
        cuts = [round(i * len(chunks) / n_parts) for i in range(n_parts + 1)]
        threads = max(1, (os.cpu_count() or 1) // n_parts) if n_parts > 1 else 0
        gpus = torch.cuda.device_count() if device == "cuda" and n_parts > 1 else 0
        # one GPU per worker, round robin, when several are visible and none is named
        jobs = [_PartJob(str(path), f"cuda:{i % gpus}" if gpus else device,
                         [c.tokens for c in chunks[a:b]], layers, m, meta, codebooks,
                         batch_size, str(tmp / f"part-{i:03d}"), i, threads, block_bytes,
                         progress)
                for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        if n_parts == 1:
            _encode_part(jobs[0])
        else:
            with ProcessPoolExecutor(n_parts, mp_context=get_context("spawn")) as pool:
                list(pool.map(_encode_part, jobs))
        log(f"encoded {len(chunks):,} references with {n_parts} worker(s) in "
            f"{time.perf_counter() - t0:.1f} s")
        spans = torch.tensor([[c.doc, c.char_start, c.char_end] for c in chunks],
                             dtype=torch.int64)
        meta_bytes = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        extra = {SPANS: TableRows(len(chunks), 3, torch.int64, [spans]),
                 META: TableRows(1, meta_bytes.numel(), torch.uint8, [meta_bytes[None]])}
        if codebooks is not None:
            books = codebooks.reshape(-1, codebooks.shape[-1])
            extra[CODEBOOKS] = TableRows(books.shape[0], books.shape[1], torch.float32, [books])
        write_bank(tmp / "part-extra", extra, block_bytes=block_bytes)

        with open(tmp / REFERENCES_FILE, "w") as f:
            for doc in docs:
                f.write(json.dumps(doc) + "\n")
        t0 = time.perf_counter()
        retriever = Retriever.build([c.text for c in chunks], embedder, embed_dim, tokenizer)
        retriever.save(tmp / RETRIEVER_DIR)
        log(f"retriever: {embedder} embeddings [{len(chunks):,}, {retriever.embedder.dim}] "
            f"({time.perf_counter() - t0:.1f} s)")
        source = {"explicit": meta,
                  "files": {REFERENCES_FILE: sha256_file(tmp / REFERENCES_FILE)}}
        parts = [Path(j.out) for j in jobs] + [tmp / "part-extra"]
        manifest = _merge_parts(parts, tmp, source)
    return manifest


def store_bytes(manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes on disk per table of a store manifest."""
    return {name: sum(b["bytes"] for b in spec["blocks"])
            for name, spec in manifest["tables"].items()}


def dense_kv_bytes(meta: dict[str, Any], tokens: float) -> float:
    """Bytes of the unsparsified bf16 K and V of ``tokens`` reference tokens in the store's
    memory layers: what a memory replaces (``tokens x layers x 2 x kv_heads x head_dim x 2``)."""
    return tokens * len(meta["layers"]) * 2 * meta["n_kv_heads"] * meta["head_dim"] * 2


def size_per_reference(manifest: dict[str, Any], text_bytes: float, tokens: float
                       ) -> dict[str, float]:
    """Bytes per memory of a store (its rows, and every table) against the mean reference's
    raw text (``text_bytes``) and its dense KV at its mean length (``tokens``) and at
    ``ref_len``."""
    meta = manifest["source"]["explicit"]
    n, sizes = meta["n_memories"], store_bytes(manifest)
    memory = sizes[MEMORIES] / n
    dense = dense_kv_bytes(meta, tokens)
    return {"memory_bytes": memory, "store_bytes": sum(sizes.values()) / n,
            "text_bytes": text_bytes, "dense_kv_bytes": dense,
            "dense_kv_bytes_ref_len": dense_kv_bytes(meta, meta["ref_len"]),
            "memory_over_text": memory / text_bytes, "dense_over_memory": dense / memory}
