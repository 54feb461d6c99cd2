"""Row-block files: the one writer and the one reader of memtron's tensor files (DESIGN §11).

A row-block file is a safetensors file (https://huggingface.co/docs/safetensors) whose tensors
start at a multiple of :data:`DATA_ALIGN` bytes, so each can be memory-mapped in place. A bank
(:mod:`memtron.storage.bank`) is a directory of such files, each holding one tensor
:data:`ROWS_KEY` (a run of rows of one table), plus ``manifest.json``::

    {"format": "memtron-bank", "version": 1,
     "tables": {name: {"n_rows", "dim", "dtype" (torch name, e.g. "float32"), "rows_per_block",
                       "blocks": [{"file", "row_start", "n_rows", "sha256", "bytes"}]}},
     "source": {...}}  # where the rows came from (checkpoint path, step, config)

The Hugging Face export writes its weight shards with the same writer (:class:`RowBlockWriter`).

This module imports only torch and the standard library: ``memtron export hf`` copies it beside
the exported model's remote code, which maps bank tables with :func:`map_bank_table` where
memtron is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

BANK_FORMAT = "memtron-bank"
BANK_VERSION = 1
BANK_MANIFEST = "manifest.json"
ROWS_KEY = "rows"  # the tensor's name inside every bank block file
DATA_ALIGN = 64  # files pad their header so that the data starts at a multiple of this
MAX_HEADER = 100 << 20  # a longer header means the file is not safetensors
TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# torch dtype <-> safetensors dtype code
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class BankError(RuntimeError):
    """A row-block file or bank is missing, malformed or corrupt; the message names the file."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the bank manifest's and the server's spelling)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    return dtype


# --------------------------------------------------------------------------- writer


class RowBlockWriter:
    """Writes one safetensors file whose tensors are streamed in, in the order declared,
    piece by piece (any number of rows at a time), hashed as they go: a tensor is never held
    whole, so files far larger than RAM are written in bounded memory.

    ``tensors``: ``(name, shape, dtype)`` of each tensor, in file order. Use as a context
    manager; :meth:`finish` checks every byte arrived, syncs, and returns ``(sha256, bytes)``.
    """

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {}
        offset = 0
        for name, shape, dtype in tensors:
            if dtype not in SAFETENSORS_DTYPES:
                raise BankError(f"{path}: {name}: dtype {dtype} has no safetensors code")
            nbytes = dtype.itemsize * _numel(shape)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)  # data starts aligned (spaces: valid JSON)
        head = len(raw).to_bytes(8, "little") + raw
        self.path, self.expected, self.written = path, offset, 0
        self.digest = hashlib.sha256(head)
        self.file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by finish or close)
        self.file.write(head)

    def write(self, rows: torch.Tensor) -> None:
        """The next rows (on any device) of the tensor being written."""
        data = memoryview(rows.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        if self.written + len(data) > self.expected:
            raise BankError(f"{self.path}: more than the {self.expected} bytes declared")
        self.file.write(data)
        self.digest.update(data)
        self.written += len(data)

    def finish(self) -> tuple[str, int]:
        """(sha256, size in bytes) of the complete file, synced to disk."""
        if self.written != self.expected:
            self.close()
            raise BankError(f"{self.path}: got {self.written} data bytes, declared "
                            f"{self.expected}")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.close()
        return self.digest.hexdigest(), self.path.stat().st_size

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RowBlockWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


# --------------------------------------------------------------------------- reader


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start, header) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise BankError(f"{path}: truncated (no safetensors header)")
            (size,) = struct.unpack("<Q", prefix)
            if size > MAX_HEADER:
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


def map_rows(path: Path, shape: tuple[int, int], dtype: torch.dtype,
             name: str = ROWS_KEY) -> torch.Tensor:
    """Tensor ``name`` of row-block file ``path``, checked to be ``dtype`` ``shape``, as a
    tensor over a read-only private mapping of the file (pages are read on first touch and
    live in the page cache, shared by every process mapping them)."""
    start, header = read_header(path)
    entry = header.get(name)
    nbytes = _numel(shape) * dtype.itemsize
    expected = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape)}
    if not isinstance(entry, dict) or {k: entry.get(k) for k in expected} != expected:
        raise BankError(f"{path}: holds {entry!r} as {name!r}, expected {expected}")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or offsets[1] - offsets[0] != nbytes:
        raise BankError(f"{path}: {name!r} has data_offsets {offsets!r}, expected {nbytes} "
                        f"bytes")
    begin, size = start + offsets[0], os.path.getsize(path)
    if begin % dtype.itemsize or begin + nbytes > size:
        raise BankError(f"{path}: {name!r} at byte {begin} does not fit a file of {size} bytes")
    storage = torch.UntypedStorage.from_file(str(path), False, size)
    return torch.empty(0, dtype=dtype).set_(storage, begin // dtype.itemsize, shape,
                                            (shape[1], 1))


def read_bank_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of the bank at directory ``path``: format, version, every table's
    fields, blocks that tile ``[0, n_rows)``, and every block file present at its size."""
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
        raise BankError(f"{manifest_path}: version {manifest.get('version')!r}, this reader "
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
    return manifest


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


def map_bank_table(path: Path, manifest: dict[str, Any], name: str) -> list[torch.Tensor]:
    """Table ``name`` of the bank at ``path`` (its checked ``manifest``) as one memory-mapped
    tensor per block file, in row order."""
    if name not in manifest["tables"]:
        raise KeyError(f"no table {name!r} in bank {path}; tables: {list(manifest['tables'])}")
    spec = manifest["tables"][name]
    dtype = dtype_from_name(spec["dtype"])
    return [map_rows(path / block["file"], (block["n_rows"], spec["dim"]), dtype)
            for block in spec["blocks"]]
