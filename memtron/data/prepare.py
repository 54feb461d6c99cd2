"""Raw text (.txt / .jsonl / .parquet) -> packed token shards (webdataset tar) + ``index.json``.

Documents are tokenized, each followed by ``eos_id``, concatenated in input order and cut into
non-overlapping samples of ``seq_len + 1`` tokens (inputs and shifted targets of one training
row); the last partial sample is dropped. Each sample is one ``<key>.npy`` member of a tar
shard, plus one ``<key>.<field>.npy`` member per per-sample field (see
:mod:`memtron.data.shards`). ``index.json`` records sizes and sha256 checksums, so the loader
can refuse a corrupt or truncated shard by name instead of training on garbage.

With a cluster tree (``clusters=``, DESIGN §5), documents are packed per leaf of the tree
instead of in one stream: samples never span leaves, each carries its leaf's root-to-leaf path
as field ``bank_path``, and each leaf's last partial sample is dropped (``dropped_tokens``).

Input formats:
  * ``.txt``: one document per paragraph; paragraphs are separated by blank lines and keep
    their inner newlines. (A file with no blank lines is a single document.)
  * ``.jsonl``: one JSON object per line, the document in field ``text_key``.
  * ``.parquet``: the document in column ``text_key``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from memtron.data.jsonl import jsonl_rows
from memtron.data.shards import (
    INDEX_FORMAT,
    INDEX_NAME,
    INDEX_VERSION,
    FieldSpec,
    ShardSink,
    building_dir,
    fields_json,
)
from memtron.data.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from memtron.data.clustering import ClusterTree

TREE_DIR = "tree"  # where prepare --clusters keeps a copy of the tree, inside the data
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


class _Packer:
    """Cuts tokenized documents into samples of ``sample_len`` tokens. Without a tree there is
    one stream in input order; with a tree, one stream per leaf: a document goes to its leaf's
    stream, so a sample only ever holds documents of one leaf and carries that leaf's path
    as its ``bank_path`` field. Each stream's last partial sample is dropped."""

    ROUTE_BATCH = 256  # documents embedded and routed at a time

    def __init__(self, sink: ShardSink, tok, sample_len: int, dtype: np.dtype,
                 tree: ClusterTree | None) -> None:
        self.sink, self.tok, self.sample_len, self.dtype, self.tree = (
            sink, tok, sample_len, dtype, tree)
        self.pending: dict[int, np.ndarray] = {}  # stream (leaf id, or -1) -> leftover tokens
        self.paths: dict[int, np.ndarray] = {}  # leaf id -> its path
        self.leaf_samples: dict[int, int] = {}
        self.waiting: list[str] = []  # documents not yet routed

    def add(self, document: str) -> None:
        if self.tree is None:
            self._append(-1, document)
            return
        self.waiting.append(document)
        if len(self.waiting) == self.ROUTE_BATCH:
            self.flush()

    def flush(self) -> None:
        """Route and pack the documents still waiting (call at the end of each input)."""
        if not self.waiting:
            return
        assert self.tree is not None
        for document, path in zip(self.waiting, self.tree.route(self.waiting), strict=True):
            leaf = int(path[-1])
            self.paths.setdefault(leaf, path)
            self._append(leaf, document)
        self.waiting = []

    def _append(self, stream: int, document: str) -> None:
        tokens = np.asarray([*self.tok.encode(document), self.tok.eos_id], dtype=self.dtype)
        buffer = np.concatenate([self.pending.get(stream, tokens[:0]), tokens])
        n_full = len(buffer) // self.sample_len
        fields = {} if stream < 0 else {"bank_path": self.paths[stream]}
        for sample in buffer[:n_full * self.sample_len].reshape(n_full, self.sample_len):
            self.sink.add(sample, fields)
        if stream >= 0 and n_full:
            self.leaf_samples[stream] = self.leaf_samples.get(stream, 0) + n_full
        self.pending[stream] = buffer[n_full * self.sample_len:]

    @property
    def dropped(self) -> int:
        return sum(len(p) for p in self.pending.values())


def prepare(
    inputs: list[str | Path],
    out_dir: str | Path,
    tokenizer: str = "byte",
    seq_len: int = 128,
    samples_per_shard: int = 2048,
    text_key: str = "text",
    clusters: str | Path | None = None,
) -> dict:
    """Tokenize and pack ``inputs`` into ``out_dir`` (replaced if it exists); returns the index.

    With ``clusters`` (a tree directory from ``memtron data cluster``), every document is
    routed to its leaf, samples are packed per leaf (a sample never spans leaves) and carry the
    leaf's path as field ``bank_path`` (int64 ``[levels]``); the tree is copied into
    ``out_dir/tree`` so that the data and the tree that addressed it travel together.

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
    tree = None
    fields: dict[str, FieldSpec] = {}
    if clusters is not None:
        from memtron.data.clustering import ClusterTree

        tree = ClusterTree.load(clusters)
        fields["bank_path"] = FieldSpec((tree.levels,), np.dtype(np.int64))

    with building_dir(out_dir) as tmp:
        sources = []
        with ShardSink(tmp, samples_per_shard, fields) as sink:
            packer = _Packer(sink, tok, sample_len, dtype, tree)
            for file in files:
                n_documents = 0
                for document in iter_documents(file, text_key):
                    if not document:
                        continue
                    packer.add(document)
                    n_documents += 1
                packer.flush()
                if n_documents == 0:
                    raise ValueError(f"{file}: no documents (empty input)")
                sources.append({"path": str(file.resolve()), "n_documents": n_documents})
        if sink.n_samples == 0:
            raise ValueError(
                f"prepare: inputs {', '.join(map(str, files))} hold only {packer.dropped} "
                f"tokens{' per leaf' if tree else ''}, fewer than one sample of seq_len + 1 = "
                f"{sample_len}"
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
            "dropped_tokens": packer.dropped,
            "sources": sources,
            "fields": fields_json(fields),
            "shards": sink.shards,
        }
        if tree is not None:
            shutil.copytree(clusters, tmp / TREE_DIR)
            per_leaf = list(packer.leaf_samples.values())
            index["clusters"] = {
                "tree": TREE_DIR, "source": str(Path(clusters).resolve()),
                "levels": tree.levels, "branching": tree.branching,
                "leaves": tree.nodes_per_level()[-1], "leaves_with_samples": len(per_leaf),
                "samples_per_leaf": {"min": min(per_leaf), "max": max(per_leaf),
                                     "mean": sum(per_leaf) / len(per_leaf)},
            }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return index
