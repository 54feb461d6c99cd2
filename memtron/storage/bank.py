"""Banks: tables of rows on disk, as row-block files plus a manifest (DESIGN §11).

:func:`write_bank` writes tables given as streams of row blocks (value tables, tree-memory
levels, explicit memories), so no table is ever held whole; :func:`open_bank` checks a bank's
manifest and files, and :meth:`Bank.table` serves a table memory-mapped
(:class:`MmapRowStore`), so a table larger than RAM is served from the page cache. The file
format and the manifest are described in :mod:`memtron.storage.rowblock`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memtron.storage.manifest import sha256_file
from memtron.storage.rowblock import (
    BANK_FORMAT,
    BANK_MANIFEST,
    BANK_VERSION,
    ROWS_KEY,
    SAFETENSORS_DTYPES,
    TABLE_NAME,
    BankError,
    RowBlockWriter,
    dtype_name,
    map_bank_table,
    read_bank_manifest,
)
from memtron.storage.store import RowStore

DEFAULT_BLOCK_BYTES = 256 << 20


@dataclass(frozen=True)
class BankBlock:
    """One block file of a bank table: rows ``[row_start, row_start + n_rows)``."""

    path: Path
    row_start: int
    n_rows: int
    sha256: str
    nbytes: int


class MmapRowStore(RowStore):
    """One bank table, its block files memory-mapped (pages are read on first touch and live in
    the page cache, shared by every process that maps them).

    A fetch sorts the ids when they are not sorted already, so each block is one
    ``index_select`` over ascending rows (sequential page access when the cache is cold), and
    writes the rows back in request order.
    """

    def __init__(self, blocks: list[BankBlock], rows: list[torch.Tensor]) -> None:
        if not blocks:
            raise BankError("a table needs at least one block")
        super().__init__(blocks[-1].row_start + blocks[-1].n_rows, rows[0].shape[1],
                         rows[0].dtype)
        self.blocks, self._rows = blocks, rows
        self._starts = torch.tensor([b.row_start for b in blocks], dtype=torch.int64)

    def _gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        if len(self._rows) == 1:
            torch.index_select(self._rows[0], 0, ids, out=out)
            return
        ordered = ids.numel() < 2 or bool((ids[1:] >= ids[:-1]).all())
        sorted_ids, order = (ids, None) if ordered else torch.sort(ids)
        dest = out if order is None else torch.empty_like(out)
        bounds = torch.searchsorted(sorted_ids, self._starts).tolist() + [ids.numel()]
        for rows, start, lo, hi in zip(self._rows, self._starts.tolist(), bounds, bounds[1:]):
            if hi > lo:
                torch.index_select(rows, 0, sorted_ids[lo:hi] - start, out=dest[lo:hi])
        if order is not None:
            out.index_copy_(0, order, dest)


class Bank:
    """An on-disk bank; open it with :func:`open_bank`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest
        self._blocks = {name: [BankBlock(path / b["file"], b["row_start"], b["n_rows"],
                                         b["sha256"], b["bytes"]) for b in spec["blocks"]]
                        for name, spec in manifest["tables"].items()}

    @property
    def tables(self) -> list[str]:
        return list(self.manifest["tables"])

    def table(self, name: str) -> MmapRowStore:
        if name not in self._blocks:
            raise KeyError(f"no table {name!r} in bank {self.path}; tables: {self.tables}")
        return MmapRowStore(self._blocks[name], map_bank_table(self.path, self.manifest, name))

    def verify(self) -> None:
        """Every block file has its recorded sha256."""
        for blocks in self._blocks.values():
            for block in blocks:
                if sha256_file(block.path) != block.sha256:
                    raise BankError(f"{block.path}: checksum mismatch (corrupt or modified)")


def open_bank(path: str | Path) -> Bank:
    """Read and check a bank's manifest, and that every block file exists with its size."""
    path = Path(path)
    return Bank(path, read_bank_manifest(path))


# --------------------------------------------------------------------------- writing


@dataclass
class TableRows:
    """A table to write: its size, and its rows as consecutive ``[r, dim]`` blocks in order
    (any r; a generator keeps only one in memory)."""

    n_rows: int
    dim: int
    dtype: torch.dtype
    blocks: Iterable[torch.Tensor]  # each is written before the next is drawn: may reuse memory


def _block_writer(root: Path, name: str, index: int, n_blocks: int, row_start: int,
                  n_rows: int, table: TableRows) -> RowBlockWriter:
    file = root / f"{name}-{index:05d}-of-{n_blocks:05d}.safetensors"
    return RowBlockWriter(file, [(ROWS_KEY, (n_rows, table.dim), table.dtype)],
                          {"format": BANK_FORMAT, "table": name, "row_start": str(row_start)})


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
    current: RowBlockWriter | None = None
    block_start = row = 0
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
                    block_start = row
                    current = _block_writer(root, name, len(done), n_blocks, row,
                                            min(rows_per_block, table.n_rows - row), table)
                block_rows = min(rows_per_block, table.n_rows - block_start)
                take = min(rows.shape[0], block_start + block_rows - row)
                current.write(rows[:take])
                rows, row = rows[take:], row + take
                if row == block_start + block_rows:
                    sha256, nbytes = current.finish()
                    done.append({"file": current.path.name, "row_start": block_start,
                                 "n_rows": block_rows, "sha256": sha256, "bytes": nbytes})
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

