"""Sharded, atomic, verifiable checkpoints (DESIGN §9).

Layout of one checkpoint, ``<run_dir>/checkpoints/step-00000200/``:
  ``.metadata``, ``__*_*.distcp``  tensors, written by ``torch.distributed.checkpoint`` (each rank
                                  its own shards; loadable at another layout)
  ``rng-rank00000.pt``            each rank's RNG states
  ``manifest.json``               step, config, data-loader state, and a sha256 per file
Everything is written under ``.tmp-step-…`` and renamed when complete, so a crash mid-save never
leaves a directory that looks finished. Loading verifies every checksum first and names the file
that is missing or corrupt.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from memtron.config import Config, config_from_dict

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message names the file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a manifest), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / MANIFEST).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save


def save_checkpoint(root: Path, step: int, tensors: dict[str, Any], meta: dict[str, Any],
                    keep_last: int, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``tensors`` (a DCP state dict) and ``meta`` (JSON) as checkpoint ``step``.

    Collective when a process group is up: every rank calls it with its own shards.
    ``write_extra(dir)`` lets every rank add files (e.g. DeepSpeed's ZeRO partitions) that the
    manifest then checksums like the rest.
    """
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng-rank{_rank():05d}.pt")
    if write_extra is not None:
        write_extra(tmp)
    _barrier()
    if _rank() == 0:
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(),
                    **meta, "files": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# --------------------------------------------------------------------------- load


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({e})") from e
    for key in ("format_version", "step", "files", "config"):
        if key not in manifest:
            raise CheckpointError(f"{manifest_path}: missing key {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format version {manifest['format_version']}, "
                              f"this memtron reads {FORMAT_VERSION}")
    return manifest


def verify_checkpoint(path: Path, manifest: dict[str, Any]) -> None:
    """Every file listed in the manifest exists and has its recorded sha256."""
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from checkpoint")
        if _sha256(file) != expected:
            raise CheckpointError(f"{file}: checksum mismatch (corrupt or truncated)")


def load_checkpoint(path: Path, tensors: dict[str, Any], verify: bool = True) -> dict[str, Any]:
    """Load into ``tensors`` in place (any sharding layout) and restore this rank's RNG state.

    Returns the manifest. Only rank 0 verifies checksums (files are on a shared file system).
    """
    manifest = read_manifest(path)
    if verify and _rank() == 0:
        verify_checkpoint(path, manifest)
    _barrier()
    try:
        dcp.load(tensors, checkpoint_id=str(path))
    except Exception as e:  # DCP raises several types; name the checkpoint either way
        raise CheckpointError(f"{path}: cannot load tensors: {e}") from e
    rng_file = path / f"rng-rank{_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return manifest


# --------------------------------------------------------------------------- offline reading


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (with ``manifest.json``), or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise CheckpointError(f"{path / 'checkpoints'}: no complete checkpoint")
        return latest
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    raise CheckpointError(f"{path}: neither a checkpoint (no {MANIFEST}: missing or incomplete) "
                          f"nor a run directory (no checkpoints/)")


class _FileSlice(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file as a seekable stream (positioned
    reads, so several slices of one descriptor never disturb each other)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.length - self.pos))
        n = os.preadv(self.fd, [view[:n]], self.offset + self.pos) if n else 0
        self.pos += n
        return n


def _pread_into(fd: int, view: memoryview, offset: int, where: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{where}: truncated (read past the end at byte {offset + done})")
        done += n


class _StoredChunk:
    """Where one saved chunk's elements lie in its ``.distcp`` file.

    DCP (torch 2.13, ``SerializationFormat.TORCH_SAVE``) writes each chunk as a complete
    ``torch.save`` zip archive at ``storage_data[index].offset``; zip records are stored
    uncompressed, so the tensor's storage is a raw little-endian byte range of the file. Its
    shape and strides come from loading the archive on the ``meta`` device (no data read); the
    record's position from the zip's local header. ``raw_offset`` is None when the bytes cannot
    be addressed directly (an extension transform, several storages, big-endian, a layout other
    than row-major): such a chunk is read whole with ``torch.load``.
    """

    def __init__(self, fd: int, file: Path, offset: int, length: int, transformed: bool) -> None:
        self.file, self.offset, self.length = file, offset, length
        self.raw_offset: int | None = None
        if transformed:
            return
        view = _FileSlice(fd, offset, length)
        try:
            meta = torch.load(view, map_location="meta", weights_only=True)
            view.seek(0)
            with zipfile.ZipFile(view) as archive:
                records = [i for i in archive.infolist() if "/data/" in i.filename
                           and i.filename.rsplit("/", 1)[-1].isdigit()]
                little = any(i.filename.endswith("/byteorder") and archive.read(i) == b"little"
                             for i in archive.infolist())
        except Exception as e:  # torch.load and zipfile raise several types
            raise CheckpointError(f"{file}: unreadable chunk at byte {offset}: {e}") from e
        self.shape, self.dtype = meta.shape, meta.dtype
        if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or not little \
                or not meta.is_contiguous():
            return
        header = os.pread(fd, 30, offset + records[0].header_offset)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{file}: bad zip header in chunk at byte {offset}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        self.raw_offset = (offset + records[0].header_offset + 30 + name_len + extra_len
                           + meta.storage_offset() * meta.dtype.itemsize)

    def read_rows(self, fd: int, start: int, stop: int, dest: torch.Tensor) -> None:
        """Copy local rows ``[start, stop)`` into ``dest`` (raw chunks only)."""
        assert self.raw_offset is not None
        row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        target = dest if dest.is_contiguous() else torch.empty(dest.shape, dtype=dest.dtype)
        if target.numel():
            view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
            _pread_into(fd, view, self.raw_offset + start * row_bytes, self.file)
        if target is not dest:
            dest.copy_(target)

    def load(self, fd: int) -> torch.Tensor:
        """The whole chunk, through ``torch.load`` (memory: one chunk)."""
        try:
            return torch.load(_FileSlice(fd, self.offset, self.length), map_location="cpu",
                              weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{self.file}: unreadable chunk at byte {self.offset}: "
                                  f"{e}") from e


class CheckpointReader:
    """Reads a checkpoint saved at any layout in one process, with no process group.

    Keys are the single-process names DCP stores (``model.blocks.0.attn.wq.weight``,
    ``model.value_tables.table0.weight``, ``optim.*``, ``memory_optim.*``); tensors come back
    whole (:meth:`read`) or by rows (:meth:`read_rows`, :meth:`iter_rows`), assembled from the
    saved chunks (one per rank shard) named in DCP's ``.metadata``. Chunk bytes are read
    straight from the ``.distcp`` files with positioned reads of just the rows asked for, so
    memory holds those rows (plus, for a chunk narrower than the tensor, its share of them),
    whatever the size of a chunk, even a whole table saved by one process. A chunk whose bytes
    cannot be addressed (see :class:`_StoredChunk`) is loaded whole, one chunk at a time.
    Checksums are verified on opening (``verify``), naming the file that fails.
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self._fds: dict[str, int] = {}  # open .distcp files, by name
        self.path = resolve_checkpoint(path)
        self.manifest = read_manifest(self.path)
        if verify:
            verify_checkpoint(self.path, self.manifest)
        try:
            self._metadata = FileSystemReader(str(self.path)).read_metadata()
        except Exception as e:  # pickle and OS errors
            raise CheckpointError(f"{self.path / '.metadata'}: unreadable ({e})") from e
        self._tensors = {k: v for k, v in self._metadata.state_dict_metadata.items()
                         if isinstance(v, TensorStorageMetadata)}
        self._chunks: dict[tuple[str, int], _StoredChunk] = {}
        self._loaded: tuple[tuple[str, int], torch.Tensor] | None = None  # last whole chunk

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    __del__ = close

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def config(self) -> Config:
        return config_from_dict(self.manifest["config"])

    def keys(self, prefix: str = "") -> list[str]:
        """Tensor keys starting with ``prefix``, sorted (non-tensor entries are left out)."""
        return sorted(k for k in self._tensors if k.startswith(prefix))

    def _meta(self, key: str) -> TensorStorageMetadata:
        if key not in self._tensors:
            raise KeyError(f"{key!r}: no such tensor in checkpoint {self.path}")
        return self._tensors[key]

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._meta(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._meta(key).properties.dtype

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor."""
        meta = self._meta(key)
        if len(meta.size) == 0:
            return self._chunk_tensor(key, meta.chunks[0]).clone()
        return self.read_rows(key, 0, meta.size[0])

    def read_rows(self, key: str, start: int, stop: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0, into ``out`` when given (a contiguous tensor of
        that shape and the key's dtype: refilling one buffer keeps memory flat)."""
        meta = self._meta(key)
        if len(meta.size) == 0:
            raise CheckpointError(f"{key}: a scalar has no rows")
        if not 0 <= start <= stop <= meta.size[0]:
            raise IndexError(f"{key}: rows [{start}, {stop}) outside [0, {meta.size[0]})")
        shape = (stop - start, *meta.size[1:])
        if out is None:
            out = torch.empty(shape, dtype=meta.properties.dtype)
        elif tuple(out.shape) != shape or out.dtype != meta.properties.dtype \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {meta.properties.dtype} tensor "
                             f"{list(shape)}, got {out.dtype} {list(out.shape)}")
        self._fill_rows(key, start, stop, out)
        return out

    def iter_rows(self, key: str, max_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(row_start, rows)`` blocks of at most ``max_rows`` rows along dim 0, in order."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        shape = self.shape(key)
        if not shape:
            raise CheckpointError(f"{key}: a scalar has no rows")
        n_rows = shape[0]
        for start in range(0, n_rows, max_rows):
            yield start, self.read_rows(key, start, min(n_rows, start + max_rows))

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's tensors (``model.`` keys, prefix stripped), whole."""
        return {k.removeprefix("model."): self.read(k) for k in self.keys("model.")}

    # -- chunks ----------------------------------------------------------------------------
    def _fill_rows(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        for chunk in self._meta(key).chunks:
            first, rows = chunk.offsets[0], chunk.sizes[0]
            lo, hi = max(start, first), min(stop, first + rows)
            if lo >= hi:
                continue
            columns = (slice(o, o + s) for o, s in zip(chunk.offsets[1:], chunk.sizes[1:]))
            dest = out[(slice(lo - start, hi - start), *columns)]
            stored = self._stored(key, chunk)
            if stored.raw_offset is not None:
                stored.read_rows(self._fd(stored.file), lo - first, hi - first, dest)
            else:
                dest.copy_(self._chunk_tensor(key, chunk)[lo - first : hi - first])

    def _fd(self, file: Path) -> int:
        if file.name not in self._fds:
            try:
                self._fds[file.name] = os.open(file, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{file}: cannot open ({e.strerror})") from e
        return self._fds[file.name]

    def _stored(self, key: str, chunk: ChunkStorageMetadata) -> _StoredChunk:
        try:
            info = self._metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        except KeyError as e:
            raise CheckpointError(f"{self.path / '.metadata'}: no storage for {key} chunk at "
                                  f"{tuple(chunk.offsets)}") from e
        where = (info.relative_path, info.offset)
        if where not in self._chunks:
            file = self.path / info.relative_path
            stored = _StoredChunk(self._fd(file), file, info.offset, info.length,
                                  bool(getattr(info, "transform_descriptors", None)))
            if stored.raw_offset is not None and (tuple(stored.shape) != tuple(chunk.sizes)
                                                  or stored.dtype != self.dtype(key)):
                raise CheckpointError(f"{file}: chunk of {key} at byte {info.offset} holds "
                                      f"{stored.dtype}{list(stored.shape)}, metadata says "
                                      f"{self.dtype(key)}{list(chunk.sizes)}")
            self._chunks[where] = stored
        return self._chunks[where]

    def _chunk_tensor(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        """A chunk loaded whole (the last one is kept, so row blocks reuse it)."""
        stored = self._stored(key, chunk)
        where = (stored.file.name, stored.offset)
        if self._loaded is None or self._loaded[0] != where:
            self._loaded = None  # free the previous chunk before loading the next
            self._loaded = (where, stored.load(self._fd(stored.file)))
        return self._loaded[1]
