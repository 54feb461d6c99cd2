"""Sharded, atomic, verifiable checkpoints (DESIGN §9).

Layout of one checkpoint, ``<run_dir>/checkpoints/step-00000200/``:
  ``.metadata``, ``__*_*.distcp``  tensors, written by ``torch.distributed.checkpoint`` (each rank
                                  its own shards, cut into chunks of at most 4 MiB by
                                  :class:`~memtron.storage.checkpoint.ChunkedSavePlanner`, so
                                  offline readers load row ranges in bounded memory; loadable
                                  at another layout)
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
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

from memtron.storage.checkpoint import ChunkedSavePlanner
from memtron.storage.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    list_checkpoints,
    read_manifest,
    sha256_file,
    step_dir,
    step_dirs,
    verify_checkpoint,
)

TMP_PREFIX = ".tmp-"
# Free space below this after a failed write means the write filled the disk (torch's own
# writers report a full disk as "unexpected pos", without the errno).
NEARLY_FULL = 16 << 20


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


def _human(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _stderr(text: str) -> None:
    if _rank() == 0:
        print(text, file=sys.stderr, flush=True)


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


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
        dcp.save(tensors, checkpoint_id=str(tmp), process_group=self.group,
                  planner=ChunkedSavePlanner())
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


def newest_valid_checkpoint(root: Path, group: dist.ProcessGroup | None = None
                            ) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``root`` whose manifest and checksums verify, and a line per
    newer one skipped, saying why. Collective: rank 0 verifies (shared file system) and every
    rank gets its choice; the skipped lines are rank 0's."""
    chosen, skipped = -1, []
    if _rank() == 0:
        for path in reversed(step_dirs(root)):
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
