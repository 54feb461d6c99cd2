"""Rows by id from RAM, an on-disk bank or a memory server (DESIGN §11).

Every memory kind (value-table rows, bank blocks, explicit memories) is rows addressed by id, so
inference reads them through one contract, :class:`RowStore`: ``fetch(ids) -> rows``. Backends:

* :class:`RamRowStore`: a tensor in this process;
* :class:`MmapRowStore`: one table of an on-disk bank (row-block safetensors files + a manifest
  with checksums, written by :mod:`memtron.export.bank`), memory-mapped, so a table larger than
  RAM is served from the page cache;
* :class:`HttpRowStore`: a client of ``memtron serve-memory`` (:mod:`memtron.infer.server`).

Bank format (``manifest.json``, format :data:`BANK_FORMAT` version :data:`BANK_VERSION`)::

    {"format": "memtron-bank", "version": 1,
     "tables": {name: {"n_rows", "dim", "dtype" (torch name, e.g. "float32"), "rows_per_block",
                       "blocks": [{"file", "row_start", "n_rows", "sha256", "bytes"}]}},
     "source": {...}}  # where the rows came from (checkpoint path, step, config)

Each block file is a safetensors file holding one tensor ``rows`` [n_rows, dim]: rows
``[row_start, row_start + n_rows)`` of its table, with its data aligned to 64 bytes.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memtron.train.checkpoint import sha256_file

BANK_FORMAT = "memtron-bank"
BANK_VERSION = 1
BANK_MANIFEST = "manifest.json"
ROWS_KEY = "rows"  # the tensor's name inside every block file
DATA_ALIGN = 64  # block files pad their header so the rows start at a multiple of this
TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
READ_BYTES = 1 << 20  # HttpRowStore reads responses in pieces of this size

# torch dtype <-> safetensors dtype code
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class BankError(RuntimeError):
    """A bank is missing, malformed or corrupt; the message names the file."""


class RemoteStoreError(RuntimeError):
    """The memory server refused a request; carries its status code and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the bank manifest's and the server's spelling)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    return dtype


def check_ids(ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``ids`` as a contiguous CPU int64 vector, every id in ``[0, n_rows)``."""
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise TypeError(f"row ids must be integers, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"row ids must be a vector [M], got shape {list(ids.shape)}")
    ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
    if ids.numel():
        low, high = torch.aminmax(ids)
        if low < 0 or high >= n_rows:
            bad = int(low) if low < 0 else int(high)
            raise IndexError(f"row id {bad} out of range: ids must lie in [0, {n_rows})")
    return ids


class RowStore(ABC):
    """Rows ``[n_rows, dim]`` of one table, fetched by id.

    ``fetch`` returns CPU rows in ``dtype`` in the order of ``ids`` (which may repeat and live on
    any device). ``stats`` counts requests, rows and bytes served by this object.
    """

    def __init__(self, n_rows: int, dim: int, dtype: torch.dtype) -> None:
        self.n_rows, self.dim, self.dtype = n_rows, dim, dtype
        self.stats = {"requests": 0, "rows": 0, "bytes": 0}
        self._stats_lock = threading.Lock()

    def fetch(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[M, dim]`` for ``ids [M]``; written into ``out`` when given (a contiguous CPU
        tensor of that shape and dtype, reused across calls to skip allocating fresh pages)."""
        ids = check_ids(ids, self.n_rows)
        shape = (ids.numel(), self.dim)
        if out is None:
            out = torch.empty(shape, dtype=self.dtype)
        elif (tuple(out.shape) != shape or out.dtype != self.dtype or out.device.type != "cpu"
              or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous CPU {self.dtype} tensor {list(shape)}, "
                             f"got {out.dtype} {list(out.shape)} on {out.device}")
        if ids.numel():
            self._gather(ids, out)
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["rows"] += ids.numel()
            self.stats["bytes"] += out.numel() * out.element_size()
        return out

    @abstractmethod
    def _gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Write rows ``ids`` (checked, CPU int64, non-empty) into ``out``."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_rows={self.n_rows}, dim={self.dim}, "
                f"dtype={dtype_name(self.dtype)})")


class RamRowStore(RowStore):
    """Rows of a tensor ``[n_rows, dim]`` (gathered on its device, returned on the CPU)."""

    def __init__(self, table: torch.Tensor) -> None:
        if table.dim() != 2:
            raise ValueError(f"a table is [n_rows, dim], got shape {list(table.shape)}")
        super().__init__(table.shape[0], table.shape[1], table.dtype)
        self.table = table

    def _gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        if self.table.device.type == "cpu":
            torch.index_select(self.table, 0, ids, out=out)
        else:
            out.copy_(self.table.index_select(0, ids.to(self.table.device)))


# --------------------------------------------------------------------------- on-disk bank


@dataclass(frozen=True)
class BankBlock:
    """One block file of a bank table: rows ``[row_start, row_start + n_rows)``."""

    path: Path
    row_start: int
    n_rows: int
    sha256: str
    nbytes: int


def _read_block_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start, header) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise BankError(f"{path}: truncated (no safetensors header)")
            (size,) = struct.unpack("<Q", prefix)
            if size > 100 << 20:
                raise BankError(f"{path}: not a safetensors file (header of {size} bytes)")
            raw = f.read(size)
    except OSError as e:
        raise BankError(f"{path}: cannot read ({e.strerror})") from e
    if len(raw) != size:
        raise BankError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise BankError(f"{path}: safetensors header is not a JSON object")
    return 8 + size, header


def _map_block(block: BankBlock, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The block's rows as a tensor over a read-only private mapping of its file."""
    start, header = _read_block_header(block.path)
    entry = header.get(ROWS_KEY)
    expected = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [block.n_rows, dim],
                "data_offsets": [0, block.n_rows * dim * dtype.itemsize]}
    if not isinstance(entry, dict) or {k: entry.get(k) for k in expected} != expected:
        raise BankError(f"{block.path}: holds {entry!r} as {ROWS_KEY!r}, the manifest says "
                        f"{expected}")
    if start % dtype.itemsize or start + expected["data_offsets"][1] != block.nbytes:
        raise BankError(f"{block.path}: rows at byte {start} do not fit a file of "
                        f"{block.nbytes} bytes")
    storage = torch.UntypedStorage.from_file(str(block.path), False, block.nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize,
                                            (block.n_rows, dim), (dim, 1))


class MmapRowStore(RowStore):
    """One bank table, its block files memory-mapped (pages are read on first touch and live in
    the page cache, shared by every process that maps them).

    A fetch sorts the ids when they are not sorted already, so each block is one
    ``index_select`` over ascending rows (sequential page access when the cache is cold), and
    writes the rows back in request order.
    """

    def __init__(self, blocks: list[BankBlock], dim: int, dtype: torch.dtype) -> None:
        if not blocks:
            raise BankError("a table needs at least one block")
        super().__init__(blocks[-1].row_start + blocks[-1].n_rows, dim, dtype)
        self.blocks = blocks
        self._rows = [_map_block(b, dim, dtype) for b in blocks]
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
    """An on-disk bank (see the module docstring); open it with :func:`open_bank`."""

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
        spec = self.manifest["tables"][name]
        return MmapRowStore(self._blocks[name], spec["dim"], dtype_from_name(spec["dtype"]))

    def verify(self) -> None:
        """Every block file has its recorded sha256."""
        for blocks in self._blocks.values():
            for block in blocks:
                if sha256_file(block.path) != block.sha256:
                    raise BankError(f"{block.path}: checksum mismatch (corrupt or modified)")


def _check_table(where: Path, name: Any, spec: Any) -> None:
    """Manifest entry of one table: the fields, and blocks that tile ``[0, n_rows)``."""
    if not isinstance(name, str) or not TABLE_NAME.fullmatch(name):
        raise BankError(f"{where}: bad table name {name!r}")
    if not isinstance(spec, dict):
        raise BankError(f"{where}: table {name!r} is not an object")
    for key in ("n_rows", "dim", "rows_per_block"):
        if not isinstance(spec.get(key), int) or isinstance(spec[key], bool) or spec[key] < 1:
            raise BankError(f"{where}: table {name!r}: {key} must be a positive integer")
    try:
        dtype_from_name(spec.get("dtype"))
    except ValueError as e:
        raise BankError(f"{where}: table {name!r}: {e}") from e
    blocks = spec.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise BankError(f"{where}: table {name!r}: blocks must be a non-empty list")
    row = 0
    for i, block in enumerate(blocks):
        fields = {"file": str, "row_start": int, "n_rows": int, "sha256": str, "bytes": int}
        if not isinstance(block, dict) or any(not isinstance(block.get(k), t)
                                              for k, t in fields.items()):
            raise BankError(f"{where}: table {name!r} block {i}: needs {list(fields)}")
        if Path(block["file"]).name != block["file"]:
            raise BankError(f"{where}: table {name!r} block {i}: file {block['file']!r} must "
                            f"be a plain file name")
        if block["row_start"] != row or block["n_rows"] < 1:
            raise BankError(f"{where}: table {name!r} block {i}: rows must continue at {row}")
        row += block["n_rows"]
    if row != spec["n_rows"]:
        raise BankError(f"{where}: table {name!r}: blocks hold {row} rows, n_rows is "
                        f"{spec['n_rows']}")


def open_bank(path: str | Path) -> Bank:
    """Read and check a bank's manifest, and that every block file exists with its size."""
    path = Path(path)
    manifest_path = path / BANK_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as e:
        raise BankError(f"{manifest_path}: missing (not a bank, or an incomplete one)") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"{manifest_path}: unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
        raise BankError(f"{manifest_path}: not a {BANK_FORMAT} manifest")
    if manifest.get("version") != BANK_VERSION:
        raise BankError(f"{manifest_path}: version {manifest.get('version')!r}, this memtron "
                        f"reads {BANK_VERSION}")
    tables = manifest.get("tables")
    if not isinstance(tables, dict) or not tables:
        raise BankError(f"{manifest_path}: no tables")
    for name, spec in tables.items():
        _check_table(manifest_path, name, spec)
        for block in spec["blocks"]:
            file = path / block["file"]
            if not file.is_file():
                raise BankError(f"{file}: missing from bank")
            size = file.stat().st_size
            if size != block["bytes"]:
                raise BankError(f"{file}: {size} bytes, the manifest says {block['bytes']} "
                                f"(truncated or replaced)")
    return Bank(path, manifest)


# --------------------------------------------------------------------------- memory server


def _tables_info(session: Any, url: str, timeout: float) -> dict[str, Any]:
    response = session.get(f"{url}/v1/tables", timeout=timeout)
    if response.status_code != 200:
        raise RemoteStoreError(response.status_code, response.text)
    return response.json()


class HttpRowStore(RowStore):
    """Table ``table`` of a memory server at ``url`` (``http://host:port``).

    Ids go out as raw little-endian int64 and rows come back as raw bytes read straight into
    the output tensor, over one keep-alive connection; requests above the server's limit are
    split. Not thread-safe: give each thread its own store.
    """

    def __init__(self, url: str, table: str, token: str | None = None,
                 timeout: float = 60.0) -> None:
        import requests

        self.url, self.table, self.timeout = url.rstrip("/"), table, timeout
        self.session = requests.Session()
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"
        info = _tables_info(self.session, self.url, timeout)
        if table not in info["tables"]:
            raise KeyError(f"no table {table!r} on {self.url}; tables: {list(info['tables'])}")
        spec = info["tables"][table]
        super().__init__(spec["n_rows"], spec["dim"], dtype_from_name(spec["dtype"]))
        self.max_ids = int(info["max_ids"])

    def _gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        for start in range(0, ids.numel(), self.max_ids):
            part = ids[start : start + self.max_ids]
            self._request(part, out[start : start + part.numel()])

    def _request(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        response = self.session.post(
            f"{self.url}/v1/tables/{self.table}/fetch", data=ids.numpy().astype("<i8").tobytes(),
            headers={"Content-Type": "application/octet-stream"}, stream=True,
            timeout=self.timeout)
        with response:
            if response.status_code != 200:
                raise RemoteStoreError(response.status_code, response.text)
            shape = response.headers.get("X-Rows-Shape", "")
            dtype = response.headers.get("X-Rows-Dtype", "")
            if shape != f"{out.shape[0]},{out.shape[1]}" or dtype != dtype_name(self.dtype):
                raise RemoteStoreError(response.status_code, f"unexpected rows {dtype} [{shape}], "
                                       f"asked for {dtype_name(self.dtype)} {list(out.shape)}")
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            done = 0
            # urllib3's readinto reads a temporary of the size asked for, then copies it:
            # pieces keep that temporary small and in cache (226 MiB of rows over loopback:
            # 0.8-1.1 GB/s read whole, 1.5-1.6 GB/s in 1 MiB pieces, as fast as http.client)
            while done < len(view):
                n = response.raw.readinto(view[done : done + READ_BYTES])
                if not n:
                    raise RemoteStoreError(response.status_code, f"response ended after {done} "
                                           f"of {len(view)} bytes")
                done += n

    def close(self) -> None:
        self.session.close()


class HttpBank:
    """The tables of a memory server, like :class:`Bank` for an on-disk one."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        import requests

        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        with requests.Session() as session:
            if token is not None:
                session.headers["Authorization"] = f"Bearer {token}"
            self.info = _tables_info(session, self.url, timeout)

    @property
    def tables(self) -> list[str]:
        return list(self.info["tables"])

    def table(self, name: str) -> HttpRowStore:
        if name not in self.info["tables"]:
            raise KeyError(f"no table {name!r} on {self.url}; tables: {self.tables}")
        return HttpRowStore(self.url, name, self.token, self.timeout)
