"""Raw text (.txt / .jsonl / .parquet) -> packed token shards (webdataset tar) + ``index.json``.

Documents are tokenized, each followed by ``eos_id``, concatenated in input order and cut into
non-overlapping samples of ``seq_len + 1`` tokens (inputs and shifted targets of one training
row); the last partial sample is dropped. Each sample is one ``<key>.npy`` member of a tar
shard, plus one ``<key>.<field>.npy`` member per per-sample field (see
:mod:`memtron.data.shards`). ``index.json`` records sizes and sha256 checksums, so the loader
can refuse a corrupt or truncated shard by name instead of training on garbage.

Input formats:
  * ``.txt``: one document per paragraph; paragraphs are separated by blank lines and keep
    their inner newlines. (A file with no blank lines is a single document.)
  * ``.jsonl``: one JSON object per line, the document in field ``text_key``.
  * ``.parquet``: the document in column ``text_key``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from memtron.data.jsonl import jsonl_rows
from memtron.data.shards import (
    INDEX_FORMAT,
    INDEX_NAME,
    INDEX_VERSION,
    ShardSink,
    building_dir,
)
from memtron.data.tokenizer import load_tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")


def _txt_documents(path: Path) -> Iterator[str]:
    lines: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\n")


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    for line_no, row in jsonl_rows(path):
        if not isinstance(row, dict) or text_key not in row:
            raise ValueError(f"{path}:{line_no}: no key {text_key!r} in this record")
        if not isinstance(row[text_key], str):
            raise ValueError(f"{path}:{line_no}: {text_key!r} is not a string")
        yield row[text_key]


def _parquet_documents(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise ValueError(f"{path}: cannot read parquet file: {e}") from e
    columns = parquet.schema_arrow.names
    if text_key not in columns:
        raise ValueError(f"{path}: no column {text_key!r} (columns: {', '.join(columns)})")
    row = 0
    for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                raise ValueError(f"{path}: row {row} of column {text_key!r} is not a string")
            row += 1
            yield value


def iter_documents(path: str | Path, text_key: str = "text") -> Iterator[str]:
    """The documents of one input file, in file order (see the module docstring for formats)."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".txt":
        documents = _txt_documents(file)
    elif suffix == ".jsonl":
        documents = _jsonl_documents(file, text_key)
    elif suffix == ".parquet":
        documents = _parquet_documents(file, text_key)
    else:
        raise ValueError(f"{file}: unknown input extension {suffix!r} (expected {SUFFIXES})")
    try:
        yield from documents
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not valid UTF-8: {e}") from e


def prepare(
    inputs: list[str | Path],
    out_dir: str | Path,
    tokenizer: str = "byte",
    seq_len: int = 128,
    samples_per_shard: int = 2048,
    text_key: str = "text",
) -> dict:
    """Tokenize and pack ``inputs`` into ``out_dir`` (replaced if it exists); returns the index.

    Everything is written to a temporary sibling directory that is renamed into place only
    when complete, so an interrupted run never leaves a directory that looks usable.
    """
    if seq_len < 1 or samples_per_shard < 1:
        raise ValueError(f"prepare: seq_len ({seq_len}) and samples_per_shard "
                         f"({samples_per_shard}) must be >= 1")
    files = [Path(p) for p in inputs]
    if not files:
        raise ValueError("prepare: no input files given")
    for file in files:  # fail on a typo before tokenizing anything
        if file.suffix.lower() not in SUFFIXES:
            raise ValueError(f"{file}: unknown input extension {file.suffix!r} "
                             f"(expected {SUFFIXES})")
        if not file.is_file():
            raise ValueError(f"{file}: input file does not exist")
    tok = load_tokenizer(tokenizer)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.int32)
    sample_len = seq_len + 1

    with building_dir(out_dir) as tmp:
        pending: list[int] = []
        sources = []
        with ShardSink(tmp, samples_per_shard) as sink:
            for file in files:
                n_documents = 0
                for document in iter_documents(file, text_key):
                    if not document:
                        continue
                    pending.extend(tok.encode(document))
                    pending.append(tok.eos_id)
                    n_documents += 1
                    n_full = len(pending) // sample_len
                    if n_full:
                        rows = np.asarray(pending[: n_full * sample_len], dtype=dtype)
                        for sample in rows.reshape(n_full, sample_len):
                            sink.add(sample)
                        del pending[: n_full * sample_len]
                if n_documents == 0:
                    raise ValueError(f"{file}: no documents (empty input)")
                sources.append({"path": str(file.resolve()), "n_documents": n_documents})
        if sink.n_samples == 0:
            raise ValueError(
                f"prepare: inputs {', '.join(map(str, files))} hold only {len(pending)} tokens, "
                f"fewer than one sample of seq_len + 1 = {sample_len}"
            )
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "seq_len": seq_len,
            "tokenizer": tok.spec,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype.name,
            "n_samples": sink.n_samples,
            "n_tokens": sink.n_samples * sample_len,
            "dropped_tokens": len(pending),
            "sources": sources,
            "fields": {},
            "shards": sink.shards,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return index
