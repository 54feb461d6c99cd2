"""Sharded, atomic, verifiable checkpoints (DESIGN §9).

Layout of one checkpoint, ``<run_dir>/checkpoints/step-00000200/``:
  ``.metadata``, ``__*_*.distcp``  tensors, written by ``torch.distributed.checkpoint`` (each rank
                                  its own shards; loadable at another layout)
  ``rng-rank00000.pt``            each rank's RNG states (and any extra per-rank files)
  ``manifest.json``               step, config, data-loader state, and a sha256 per file
Everything is written under ``.tmp-step-…``; the manifest is written last, once every file is
complete and checksummed, and only then is the directory renamed. A crash mid-save, even a
``kill -9`` during an asynchronous save, never leaves a directory that looks finished, and the
leftover is removed at the next start. A write that fails (full disk, I/O error, permission)
removes its temporary directory on every rank and raises one :class:`CheckpointError` with the
errno and the space needed; older checkpoints are never touched before a new one is complete.
Loading verifies every checksum first and names the file that is missing or corrupt; ``--resume
auto`` falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import math
import os
import random
import shutil
import struct
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

from memtron.config import Config, config_from_dict

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"
# Free space below this after a failed write means the write filled the disk (torch's own
# writers report a full disk as "unexpected pos", without the errno).
NEARLY_FULL = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible, or cannot be written; the
    message names the file or directory."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_max(values: list[int], group: dist.ProcessGroup | None) -> list[int]:
    """Element-wise max over the ranks of ``group``; a barrier as well."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _human(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _stderr(text: str) -> None:
    if _rank() == 0:
        print(text, file=sys.stderr, flush=True)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _step_dirs(root: Path) -> list[Path]:
    """``step-NNNNNNNN`` directories under ``root``, complete or not, oldest first."""
    found = root.glob("step-*") if root.is_dir() else []
    return sorted((p for p in found if p.name[5:].isdigit()), key=lambda p: p.name)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a manifest), oldest first."""
    return [p for p in _step_dirs(root) if (p / MANIFEST).is_file()]


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def remove_stale_temp(root: Path) -> list[str]:
    """Delete the temporary directories of saves that crashed (they hold disk space a resumed
    run needs); returns one log line per directory. Call on one rank, before any save."""
    lines = []
    for tmp in sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []:
        size = checkpoint_bytes(tmp) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        lines.append(f"removed {tmp} ({_human(size)}) left by an interrupted checkpoint save")
    return lines


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


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(tree, torch.Tensor):
        yield prefix.rstrip("."), tree


def _nonfinite(tensors: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (this rank's shards),
    checked in slices so that no full-size temporary is made."""
    bad = []
    for name, t in _leaves(tensors):
        flat = (t.to_local() if isinstance(t, DTensor) else t).detach().reshape(-1)
        if flat.is_floating_point() and not all(bool(torch.isfinite(part).all())
                                                for part in flat.split(1 << 24)):
            bad.append(name)
    return bad


def _global_bytes(tensors: dict[str, Any]) -> int:
    """Bytes the tensors take in a checkpoint: DTensors at their global size, stored once."""
    return sum(t.numel() * t.element_size() for _, t in _leaves(tensors))


def _errno_of(error: BaseException) -> int:
    """The OS error behind ``error``: its own, a chained one, or one a DCP rank reported."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        if isinstance(e, CheckpointException):
            todo.extend(exc for exc, _ in e.failures.values())
        todo.extend([e.__cause__, e.__context__])
    return 0


def _free_bytes(path: Path) -> int:
    """Free space on the file system that holds (or will hold) ``path``."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> None:
    # Through a Python file object, so that a failed write keeps its errno in the chain.
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class CheckpointWriter:
    """Writes the checkpoints of one run under ``root``, in the caller's thread or, with
    ``async_save``, from a staged CPU copy in a background thread, so that training is blocked
    only for the copy. One save is in flight at most: the next one waits for it.

    Checkpoint collectives run on a gloo group of their own: from a background thread they must
    not interleave with the training collectives, and gloo takes CPU tensors whatever the
    training backend is.
    """

    def __init__(self, root: Path, keep_last: int, async_save: bool = False,
                 timeout_s: float = 600.0,
                 log: Callable[[str], None] = _stderr) -> None:
        self.root, self.keep_last, self.log = root, keep_last, log
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._pool, self._stager = None, None
        if async_save:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="memtron-checkpoint")
            # torch reuses one staging copy only in pinned memory, which needs an accelerator.
            self._stager = BlockingAsyncStager(cache_staged_state_dict=torch.cuda.is_available())
        self._pending: Future | None = None
        self._last_bytes: int | None = None  # size of the newest checkpoint (rank 0)

    @property
    def asynchronous(self) -> bool:
        return self._pool is not None

    def save(self, step: int, tensors: dict[str, Any], meta: dict[str, Any],
             files: dict[str, Any] | None = None) -> Path:
        """Checkpoint ``step``: ``tensors`` is a DCP state dict (this rank's shards), ``meta``
        the JSON of the manifest, ``files`` objects this rank writes beside them with
        ``torch.save`` (its RNG states are added). Collective. Asynchronous: returns once the
        state is staged; the checkpoint exists when :meth:`wait` returns."""
        self.wait()
        files = {**(files or {}), f"rng-rank{_rank():05d}.pt": rng_state()}
        needed = self._check_space(step, tensors)
        if self._pool is None or self._stager is None:
            return self._write(step, tensors, meta, files, needed)
        tensors = self._stager.stage(tensors)
        files = tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), files)
        self._pending = self._pool.submit(self._write, step, tensors, copy.deepcopy(meta),
                                          files, needed)
        return step_dir(self.root, step)

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is complete; raises its error."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def failed(self) -> bool:
        """The save in flight has ended with an error (a local check: no collective)."""
        return self._pending is not None and self._pending.done() and \
            self._pending.exception() is not None

    # -- internals --------------------------------------------------------------------------
    def _check_space(self, step: int, tensors: dict[str, Any]) -> int:
        """Bytes the checkpoint will take (the previous checkpoint's size, else the tensors');
        rank 0 warns before writing when the disk has less."""
        if _rank() != 0:
            return _global_bytes(tensors)
        if self._last_bytes is None:
            previous = list_checkpoints(self.root)
            self._last_bytes = checkpoint_bytes(previous[-1]) if previous else None
        needed = self._last_bytes or _global_bytes(tensors)
        free = _free_bytes(self.root)
        if free < needed:
            self.log(f"warning: checkpoint step {step} needs about {_human(needed)} but only "
                     f"{_human(free)} is free under {self.root}; the save will probably fail "
                     "(free space, or lower checkpoint.keep_last)")
        return needed

    def _agree(self, error: BaseException | None, nonfinite: bool) -> tuple[int, int, int]:
        """(write failed, errno, state non-finite), the same on every rank; a barrier too."""
        code = 0
        if error is not None:
            code = _errno_of(error)
            if not code and _free_bytes(self.root) < NEARLY_FULL:
                code = errno.ENOSPC
        failed, code, bad = _all_max([int(error is not None), code, int(nonfinite)], self.group)
        return failed, code, bad

    def _write(self, step: int, tensors: dict[str, Any], meta: dict[str, Any],
               files: dict[str, Any], needed: int) -> Path:
        """Each phase ends in an agreement, so that every rank stops at the same point."""
        final = step_dir(self.root, step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        start = time.perf_counter()
        nonfinite = _nonfinite(tensors)
        error: BaseException | None = None
        for phase in (lambda: self._prepare(tmp),
                      lambda: self._write_files(tmp, tensors, files),
                      lambda: self._publish(tmp, final, step, meta)):
            try:
                phase()
            except (Exception, CheckpointException) as e:  # DCP's is a BaseException
                error = e
            failed, code, bad = self._agree(error, bool(nonfinite))
            if failed or bad:
                break
        leader = _rank() == 0
        if failed or bad:
            free = _free_bytes(self.root)
            if leader:
                shutil.rmtree(tmp, ignore_errors=True)
            if bad:
                where = ", ".join(nonfinite[:8]) if nonfinite else "another rank's shards"
                raise CheckpointError(f"checkpoint step {step} not written to {self.root}: "
                                      f"non-finite values in {where}; a diverged state is "
                                      "never checkpointed")
            cause = (f"[Errno {code}] {os.strerror(code)} ({errno.errorcode.get(code, '?')})"
                     if code else f"{type(error).__name__}: {error}" if error is not None
                     else "failed on another rank")
            raise CheckpointError(
                f"checkpoint step {step} could not be written to {self.root}: {cause}; it "
                f"needs about {_human(needed)}, {_human(free)} is free there. The temporary "
                "directory was removed and the previous checkpoints are untouched: free space "
                "and rerun with --resume auto") from error
        if leader:
            self._last_bytes = checkpoint_bytes(final)
            how = " in the background" if self.asynchronous else ""
            self.log(f"checkpoint {final.name}: {_human(self._last_bytes)} written{how} in "
                     f"{time.perf_counter() - start:.2f} s")
            free = _free_bytes(self.root)
            if free < self._last_bytes:
                self.log(f"warning: {_human(free)} free under {self.root}, less than one more "
                         f"checkpoint ({_human(self._last_bytes)}): the next save will fail "
                         "unless space is freed")
        return final

    def _prepare(self, tmp: Path) -> None:
        if _rank() == 0:  # rank 0 alone handles the directories
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def _write_files(self, tmp: Path, tensors: dict[str, Any], files: dict[str, Any]) -> None:
        dcp.save(tensors, checkpoint_id=str(tmp), process_group=self.group)
        for name, obj in files.items():
            _save_file(obj, tmp / name)

    def _publish(self, tmp: Path, final: Path, step: int, meta: dict[str, Any]) -> None:
        """Rank 0, once every rank's files are complete: checksums, the manifest last, the
        rename, and the rotation of checkpoints older than this one."""
        if _rank() != 0:
            return
        checksums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(),
                    **meta, "files": checksums}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a corrupt one skipped at resume, or an abandoned future
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        older = [p for p in list_checkpoints(self.root) if _step_of(p) < step]
        for old in older[:max(0, len(older) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- load


def save_checkpoint(root: Path, step: int, tensors: dict[str, Any], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """One synchronous checkpoint outside a training run (e.g. ``memtron import hf``), with the
    same layout, manifest and failure handling as the trainer's. Collective when a process
    group is up."""
    return CheckpointWriter(root, keep_last).save(step, tensors, meta)


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
        if sha256_file(file) != expected:
            raise CheckpointError(f"{file}: checksum mismatch (corrupt or truncated)")


def newest_valid_checkpoint(root: Path, group: dist.ProcessGroup | None = None
                            ) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``root`` whose manifest and checksums verify, and a line per
    newer one skipped, saying why. Collective: rank 0 verifies (shared file system) and every
    rank gets its choice; the skipped lines are rank 0's."""
    chosen, skipped = -1, []
    if _rank() == 0:
        for path in reversed(_step_dirs(root)):
            try:
                verify_checkpoint(path, read_manifest(path))
            except CheckpointError as e:
                skipped.append(f"skipped {path.name}: {e}")
                continue
            chosen = _step_of(path)
            break
    (chosen,) = _all_max([chosen], group)
    return (step_dir(root, chosen) if chosen >= 0 else None), skipped


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
    except (Exception, CheckpointException) as e:  # name the checkpoint whatever DCP raises
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
        complete = list_checkpoints(path / "checkpoints")
        if not complete:
            raise CheckpointError(f"{path / 'checkpoints'}: no complete checkpoint")
        return complete[-1]
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


VALUE_TABLE_KEY = "model.value_tables."  # + "<table>.weight"


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
        factors = self.owed_decay(key, start, stop)
        if factors is not None:
            out.copy_(out.float().mul_(factors.unsqueeze(1)))
        return out

    def owed_decay(self, key: str, start: int, stop: int) -> torch.Tensor | None:
        """fp32 factors [stop - start] by which rows ``[start, stop)`` of value table ``key``
        must be multiplied to be decayed to the checkpoint's step, or None. Tables trained with
        global weight decay are saved as the optimizer holds them, rows owing the decay of the
        steps since they were last touched (``train/optim.py``), so a run resumes bit for bit
        whenever it was saved; readers (:meth:`read_rows`, and so :meth:`read`, the exports)
        get the decayed rows."""
        if not (key.startswith(VALUE_TABLE_KEY) and key.endswith(".weight")):
            return None
        name = key.removeprefix(VALUE_TABLE_KEY).removesuffix(".weight")
        row_clock = f"memory_optim.{name}.row_decay_clock"
        if row_clock not in self._tensors:
            return None
        clock = self.read(f"memory_optim.{name}.decay_clock")
        return torch.exp(clock - self.read_rows(row_clock, start, stop)).float()

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
