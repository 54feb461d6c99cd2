"""Checkpoint -> on-disk row-block bank (DESIGN §9, §11).

A bank is tables of rows stored as row-block safetensors files plus a manifest with a sha256
per file (format in :mod:`memtron.infer.store`), so inference can memory-map a value table far
larger than RAM or serve it with ``memtron serve-memory``. :func:`write_bank` writes any tables
given as streams of row blocks (value tables here; hierarchical-bank blocks use the same
format); :func:`export_bank` feeds it a checkpoint's value tables through
:class:`~memtron.train.checkpoint.CheckpointReader`, so no table is ever held whole: memory
stays at one read block (:data:`READ_BYTES`) whatever the table or block-file size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from memtron.infer.store import (
    BANK_FORMAT,
    BANK_MANIFEST,
    BANK_VERSION,
    DATA_ALIGN,
    ROWS_KEY,
    SAFETENSORS_DTYPES,
    TABLE_NAME,
    BankError,
    dtype_name,
)
from memtron.train.checkpoint import CheckpointReader, sha256_file

DEFAULT_BLOCK_BYTES = 256 << 20
READ_BYTES = 16 << 20  # rows read from a checkpoint at a time
VALUE_TABLE_PREFIX = "model.value_tables."


@dataclass
class TableRows:
    """A table to write: its size, and its rows as consecutive ``[r, dim]`` blocks in order
    (any r; a generator keeps only one in memory)."""

    n_rows: int
    dim: int
    dtype: torch.dtype
    blocks: Iterable[torch.Tensor]  # each is written before the next is drawn: may reuse memory


class _BlockFile:
    """One block file being written: safetensors header, then rows streamed in, hashed as they
    go."""

    def __init__(self, path: Path, table: str, row_start: int, n_rows: int, dim: int,
                 dtype: torch.dtype) -> None:
        self.path, self.row_start, self.n_rows = path, row_start, n_rows
        self.expected = n_rows * dim * dtype.itemsize
        header = {ROWS_KEY: {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [n_rows, dim],
                             "data_offsets": [0, self.expected]},
                  "__metadata__": {"format": BANK_FORMAT, "table": table,
                                   "row_start": str(row_start)}}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)  # rows start aligned (spaces: valid JSON)
        head = len(raw).to_bytes(8, "little") + raw
        self.digest = hashlib.sha256(head)
        self.file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by finish or close)
        self.file.write(head)
        self.written = 0  # row bytes

    def write(self, rows: torch.Tensor) -> None:
        data = memoryview(rows.contiguous().view(-1).view(torch.uint8).numpy())
        self.file.write(data)
        self.digest.update(data)
        self.written += len(data)

    def close(self) -> None:
        self.file.close()

    def finish(self) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.close()
        assert self.written == self.expected, (self.path, self.written, self.expected)
        return {"file": self.path.name, "row_start": self.row_start, "n_rows": self.n_rows,
                "sha256": self.digest.hexdigest(), "bytes": self.path.stat().st_size}


def _write_table(root: Path, name: str, table: TableRows, block_bytes: int) -> dict[str, Any]:
    if not TABLE_NAME.fullmatch(name):
        raise BankError(f"table name {name!r}: use letters, digits, '_', '.', '-'")
    if table.n_rows < 1 or table.dim < 1:
        raise BankError(f"table {name!r}: needs rows and columns, got [{table.n_rows}, "
                        f"{table.dim}]")
    if table.dtype not in SAFETENSORS_DTYPES:
        raise BankError(f"table {name!r}: dtype {table.dtype} has no safetensors code")
    row_bytes = table.dim * table.dtype.itemsize
    rows_per_block = max(1, min(table.n_rows, block_bytes // row_bytes))
    n_blocks = math.ceil(table.n_rows / rows_per_block)
    done: list[dict[str, Any]] = []
    current: _BlockFile | None = None
    row = 0
    try:
        for rows in table.blocks:
            if rows.dim() != 2 or rows.shape[1] != table.dim or rows.dtype != table.dtype:
                raise BankError(f"table {name!r}: got a block {rows.dtype} {list(rows.shape)} "
                                f"at row {row}, expected {table.dtype} [r, {table.dim}]")
            if row + rows.shape[0] > table.n_rows:
                raise BankError(f"table {name!r}: more than n_rows = {table.n_rows} rows")
            rows = rows.cpu()
            while rows.shape[0]:
                if current is None:
                    file = root / f"{name}-{len(done):05d}-of-{n_blocks:05d}.safetensors"
                    current = _BlockFile(file, name, row, min(rows_per_block, table.n_rows - row),
                                         table.dim, table.dtype)
                take = min(rows.shape[0], current.row_start + current.n_rows - row)
                current.write(rows[:take])
                rows, row = rows[take:], row + take
                if row == current.row_start + current.n_rows:
                    done.append(current.finish())
                    current = None
    finally:
        if current is not None:
            current.close()
    if row != table.n_rows:
        raise BankError(f"table {name!r}: got {row} rows, n_rows is {table.n_rows}")
    return {"n_rows": table.n_rows, "dim": table.dim, "dtype": dtype_name(table.dtype),
            "rows_per_block": rows_per_block, "blocks": done}


def write_bank(out: str | Path, tables: Mapping[str, TableRows],
               source: dict[str, Any] | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES,
               overwrite: bool = False) -> dict[str, Any]:
    """Write ``tables`` as a bank at ``out`` and return its manifest.

    Block files hold at most ``block_bytes`` of rows (at least one row). Everything is written
    under a temporary sibling directory and renamed when complete, so a crash never leaves a
    directory that looks like a finished bank.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BankError(f"{out}: exists (pass overwrite=True to replace it)")
    if not tables:
        raise BankError(f"{out}: no tables to write")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = {"format": BANK_FORMAT, "version": BANK_VERSION,
                    "tables": {name: _write_table(tmp, name, table, block_bytes)
                               for name, table in tables.items()},
                    "source": source or {}}
        with open(tmp / BANK_MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _read_blocks(reader: CheckpointReader, key: str) -> Iterator[torch.Tensor]:
    """The rows of ``key``, :data:`READ_BYTES` at a time, refilling one buffer (fresh blocks
    would leave freed 16 MiB chunks for the allocator to hold on to)."""
    n_rows, dim = reader.shape(key)
    step = max(1, READ_BYTES // (dim * reader.dtype(key).itemsize))
    buffer = torch.empty(min(step, n_rows), dim, dtype=reader.dtype(key))
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        yield reader.read_rows(key, start, stop, out=buffer[: stop - start])


def bank_source(config: dict[str, Any], tree: str | Path | None) -> dict[str, Any] | None:
    """The hierarchical bank's entry of a bank manifest's ``source`` (None without a bank):
    its shape, its level tables (row i of ``bank{l}`` = node ``offsets[l] + i``), and the
    cluster tree that routes prompts to node ids, with the sha256 of the tree's manifest.
    ``tree``: the tree directory; default: the copy ``prepare --clusters`` keeps with the
    training data (``data.train/tree``), if present."""
    bank = config.get("bank") or {}
    if not bank.get("layers"):
        return None
    from memtron.data.clustering import TREE_MANIFEST
    from memtron.data.prepare import TREE_DIR
    from memtron.model.memory.hierarchical import level_offsets, table_name

    nodes = [bank["branching"] ** (level + 1) for level in range(bank["levels"])]
    entry: dict[str, Any] = {
        "levels": bank["levels"], "branching": bank["branching"], "layers": bank["layers"],
        "block_sizes": bank["block_sizes"], "d_model": config["model"]["d_model"],
        "tables": [table_name(level) for level in range(bank["levels"])],
        "offsets": level_offsets(nodes), "tree": None, "tree_sha256": None}
    tree = Path(tree) if tree is not None else Path(config["data"]["train"]) / TREE_DIR
    if (tree / TREE_MANIFEST).is_file():
        entry["tree"] = str(tree.resolve())
        entry["tree_sha256"] = sha256_file(tree / TREE_MANIFEST)
    return entry


def export_bank(ckpt: str | Path, out: str | Path, block_bytes: int = DEFAULT_BLOCK_BYTES,
                overwrite: bool = False, tree: str | Path | None = None) -> dict[str, Any]:
    """Write every value table of checkpoint ``ckpt`` (a checkpoint or run directory) as a bank
    at ``out``, in the dtype it was saved in; returns the manifest, whose ``source`` records the
    checkpoint's path, step and config so a loader can check the bank matches its model.
    Hierarchical-bank level tables are among them (rows addressed by node); ``source["bank"]``
    (:func:`bank_source`) records how node ids map to rows and which tree routes prompts."""
    with CheckpointReader(ckpt) as reader:
        keys = [k for k in reader.keys(VALUE_TABLE_PREFIX) if k.endswith(".weight")]
        if not keys:
            raise BankError(f"{reader.path}: no value tables ({VALUE_TABLE_PREFIX}*.weight)")
        tables = {}
        for key in keys:
            shape, dtype = reader.shape(key), reader.dtype(key)
            if len(shape) != 2:
                raise BankError(f"{reader.path}: {key} has shape {list(shape)}, not [N, d]")
            name = key.removeprefix(VALUE_TABLE_PREFIX).removesuffix(".weight")
            tables[name] = TableRows(shape[0], shape[1], dtype, _read_blocks(reader, key))
        source = {"checkpoint": str(reader.path.resolve()), "step": reader.step,
                  "config": reader.manifest["config"]}
        hierarchical = bank_source(reader.manifest["config"], tree)
        if hierarchical is not None:
            source["bank"] = hierarchical
        return write_bank(out, tables, source, block_bytes, overwrite)
