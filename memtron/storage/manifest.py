"""Checksums and checkpoint manifests (DESIGN §9): what says a directory is complete and intact.

A checkpoint directory ``<run_dir>/checkpoints/step-00000200/`` is complete when it holds
:data:`MANIFEST` (step, config, data-loader state, and a sha256 per file), written last by
:mod:`memtron.train.checkpoint`. Readers (resume, exports, inference) check it here, naming the
file that is missing or corrupt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible, or cannot be written; the
    message names the file or directory."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def step_dirs(root: Path) -> list[Path]:
    """``step-NNNNNNNN`` directories under ``root``, complete or not, oldest first."""
    found = root.glob("step-*") if root.is_dir() else []
    return sorted((p for p in found if p.name[5:].isdigit()), key=lambda p: p.name)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a manifest), oldest first."""
    return [p for p in step_dirs(root) if (p / MANIFEST).is_file()]


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
