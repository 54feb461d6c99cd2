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
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

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
