"""The on-disk format of prepared token shards: writer, checked reader, per-sample fields.

A prepared directory holds ``index.json`` and webdataset tar shards ``shard-NNNNN.tar``. Sample
``k`` is the tar member ``<k>.npy`` (its ``seq_len + 1`` tokens) plus one member
``<k>.<field>.npy`` per named per-sample field, e.g. ``bank_path`` (int64 ``[levels]``: the
sample's hierarchical-bank tree path) or ``memory_ids`` (int64 ``[L/64, r]``: its explicit
memories). ``index.json`` records every shard's size and sha256 and, under ``"fields"``, each
field's per-sample shape and dtype, so a reader refuses a corrupt shard or a mismatched field
by file name instead of training on garbage.

Fields can be written by ``prepare`` or added later with :func:`add_sample_field`, which
rewrites the shards into a fresh directory and swaps it in, so a crash never leaves shards and
index disagreeing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset

INDEX_NAME = "index.json"
INDEX_FORMAT = "memtron-token-shards"
INDEX_VERSION = 2  # 2: "fields" (per-sample named arrays); version 1 (no fields) is still read
READ_VERSIONS = (1, 2)
SHARD_NAME = "shard-{:05d}.tar"
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# A field source: one array per sample in sample order (a [n_samples, ...] array works), or a
# function called once per shard with that shard's tokens [n, seq_len + 1] and the global index
# of its first sample, returning the shard's field values [n, ...] (bounded memory).
FieldSource = Iterable[np.ndarray] | Callable[[np.ndarray, int], np.ndarray]


class DataError(RuntimeError):
    """A shard or index is missing, corrupt or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Shard:
    path: Path
    n_samples: int
    nbytes: int
    sha256: str
    tokens_sha256: str | None = None  # of the token arrays alone: fields may be added later


@dataclass(frozen=True)
class FieldSpec:
    """Per-sample shape and dtype of one named field."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype.name}


def check_field_name(name: str) -> str:
    """Field names become tar member suffixes and batch keys: identifiers only, not ``npy``."""
    if not isinstance(name, str) or not FIELD_NAME.fullmatch(name) or name == "npy":
        raise ValueError(f"bad sample field name {name!r}: use a Python identifier other "
                         "than 'npy'")
    return name


class ShardSink:
    """Writes samples (tokens + named fields) into numbered tar shards and records each shard's
    size and sha256. ``fields`` fixes the field names, shapes and dtypes every sample carries."""

    def __init__(self, directory: Path, samples_per_shard: int,
                 fields: Mapping[str, FieldSpec] | None = None, first_key: int = 0,
                 names: Callable[[int], str] = SHARD_NAME.format):
        self.directory = directory
        self.samples_per_shard = samples_per_shard
        self.fields = dict(fields or {})
        self.names = names  # shard number -> file name
        self.shards: list[dict] = []
        self.n_samples = 0
        self.first_key = first_key  # sample keys are first_key, first_key + 1, ...
        self._writer: webdataset.TarWriter | None = None
        self._in_shard = 0
        self._tokens_hash = hashlib.sha256()

    def add(self, sample: np.ndarray, fields: Mapping[str, np.ndarray] | None = None) -> None:
        fields = fields or {}
        if set(fields) != set(self.fields):
            raise ValueError(f"sample {self.n_samples}: fields {sorted(fields)}, expected "
                             f"{sorted(self.fields)}")
        record = {"__key__": f"{self.first_key + self.n_samples:010d}", "npy": sample}
        for name, spec in self.fields.items():
            value = np.asarray(fields[name])
            if value.shape != spec.shape or value.dtype != spec.dtype:
                raise ValueError(f"sample {self.n_samples}: field {name!r} has shape "
                                 f"{value.shape} {value.dtype}, expected {spec.shape} "
                                 f"{spec.dtype}")
            record[f"{name}.npy"] = value
        if self._writer is None:
            name = self.names(len(self.shards))
            # mtime fixed so that the same input gives byte-identical shards and checksums
            self._writer = webdataset.TarWriter(str(self.directory / name), mtime=0)
            self.shards.append({"name": name})
        self._writer.write(record)
        self._tokens_hash.update(np.ascontiguousarray(sample).tobytes())
        self.n_samples += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self.finish_shard()

    def finish_shard(self) -> None:
        """Close the shard being written (if any) so that the next sample starts a new one."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        shard = self.shards[-1]
        data = (self.directory / shard["name"]).read_bytes()
        shard.update(n_samples=self._in_shard, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(),
                     tokens_sha256=self._tokens_hash.hexdigest())
        self._in_shard = 0
        self._tokens_hash = hashlib.sha256()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self._writer is None:
            return
        if exc_type is None:
            self.finish_shard()  # the last, partial shard
        else:
            self._writer.close()


def fields_json(fields: Mapping[str, FieldSpec]) -> dict:
    return {name: spec.to_json() for name, spec in fields.items()}


def read_json_manifest(path: Path, fmt: str, versions: tuple[int, ...],
                       error: type[Exception], missing_hint: str) -> dict:
    """A JSON object with ``"format": fmt`` and a version in ``versions``, or ``error`` naming
    ``path`` (``missing_hint`` says how to make a missing one)."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file ({missing_hint})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise error(f"{path}: not a {fmt} file")
    if manifest.get("version") not in versions:
        raise error(f"{path}: version {manifest.get('version')!r}, this code reads "
                    f"{', '.join(map(str, versions))}")
    return manifest


def read_index(directory: str | Path, seq_len: int | None = None) -> tuple[dict, list[Shard]]:
    """Parse and check ``index.json``; shard files must exist with the recorded sizes.
    ``index["fields"]`` is always present afterwards (``{}`` for a version-1 index)."""
    index_path = Path(directory) / INDEX_NAME
    index = read_json_manifest(index_path, INDEX_FORMAT, READ_VERSIONS, DataError,
                               "run `prepare` on the raw data first")
    for key in ("seq_len", "dtype", "n_samples", "shards"):
        if key not in index:
            raise DataError(f"{index_path}: missing key {key!r}")
    if index["dtype"] not in ("uint16", "int32"):
        raise DataError(f"{index_path}: dtype {index['dtype']!r} is not uint16 or int32")
    if seq_len is not None and index["seq_len"] != seq_len:
        raise DataError(f"{index_path}: seq_len is {index['seq_len']} but {seq_len} was "
                        "requested (re-run prepare with this seq_len)")
    index["fields"] = _parse_fields(index.get("fields", {}), index_path)
    shards = []
    for i, entry in enumerate(index["shards"]):
        try:
            shard = Shard(Path(directory) / entry["name"], int(entry["n_samples"]),
                          int(entry["bytes"]), str(entry["sha256"]),
                          entry.get("tokens_sha256"))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{index_path}: shards[{i}] is malformed: {e!r}") from e
        if not shard.path.is_file():
            raise DataError(f"{shard.path}: shard listed in {index_path} is missing")
        size = shard.path.stat().st_size
        if size != shard.nbytes:
            raise DataError(f"{shard.path}: {size} bytes, {index_path} says {shard.nbytes} "
                            "(truncated or overwritten shard)")
        shards.append(shard)
    if sum(s.n_samples for s in shards) != index["n_samples"]:
        raise DataError(f"{index_path}: n_samples disagrees with the sum over shards")
    return index, shards


def field_specs(index: dict) -> dict[str, FieldSpec]:
    """The fields of an index returned by :func:`read_index`."""
    return {name: FieldSpec(tuple(f["shape"]), np.dtype(f["dtype"]))
            for name, f in index["fields"].items()}


def _parse_fields(fields: object, index_path: Path) -> dict:
    if not isinstance(fields, dict):
        raise DataError(f"{index_path}: 'fields' is not an object")
    for name, f in fields.items():
        try:
            check_field_name(name)
            shape = [int(d) for d in f["shape"]]
            np.dtype(f["dtype"])
            if any(d < 0 for d in shape):
                raise ValueError(f"negative dimension in {shape}")
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{index_path}: fields[{name!r}] is malformed: {e}") from e
    return fields


def load_shard(shard: Shard, sample_len: int, dtype: np.dtype,
               fields: Mapping[str, FieldSpec]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All samples of one shard: tokens ``[n, sample_len]`` and each field ``[n, *shape]``,
    after checking size, sha256, and that every sample has exactly the index's fields."""
    try:
        data = shard.path.read_bytes()
    except OSError as e:
        raise DataError(f"{shard.path}: cannot read shard: {e}") from e
    if len(data) != shard.nbytes:
        raise DataError(f"{shard.path}: {len(data)} bytes, index says {shard.nbytes} "
                        "(truncated or overwritten shard)")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DataError(f"{shard.path}: sha256 mismatch with the index (corrupt shard)")
    samples: dict[str, dict[str, np.ndarray]] = {}  # key -> {"npy" | field: array}, in order
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                part = "npy" if suffix == "npy" else suffix.removesuffix(".npy")
                if not suffix.endswith("npy") or (part != "npy" and part not in fields):
                    raise DataError(f"{shard.path}: unexpected member {member.name!r} (fields "
                                    f"in the index: {sorted(fields) or 'none'})")
                payload = tar.extractfile(member).read()
                samples.setdefault(key, {})[part] = np.load(io.BytesIO(payload),
                                                            allow_pickle=False)
    except (tarfile.TarError, ValueError, OSError) as e:
        raise DataError(f"{shard.path}: unreadable tar shard: {e}") from e
    if len(samples) != shard.n_samples:
        raise DataError(f"{shard.path}: {len(samples)} samples, index says {shard.n_samples}")
    expected = {"npy": FieldSpec((sample_len,), np.dtype(dtype)), **fields}
    for key, parts in samples.items():
        if set(parts) != set(expected):
            missing = sorted(set(expected) - set(parts))
            raise DataError(f"{shard.path}: sample {key} lacks "
                            f"{', '.join('tokens' if m == 'npy' else repr(m) for m in missing)}")
        for part, spec in expected.items():
            if parts[part].shape != spec.shape or parts[part].dtype != spec.dtype:
                what = "sample" if part == "npy" else f"field {part!r} of sample {key}"
                raise DataError(f"{shard.path}: {what} has shape {parts[part].shape} "
                                f"{parts[part].dtype}, expected {spec.shape} {spec.dtype}")
    rows = list(samples.values())
    tokens = np.stack([r["npy"] for r in rows])
    return tokens, {name: np.stack([r[name] for r in rows]) for name in fields}


@contextlib.contextmanager
def building_dir(out: str | Path) -> Iterator[Path]:
    """An empty temporary sibling of ``out`` to write into: when the block completes it
    replaces ``out`` whole; on any error it is removed. Readers never see a half-written
    directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _field_values(values: FieldSource, tokens: np.ndarray, first: int,
                  per_sample: Iterator[np.ndarray] | None) -> list[np.ndarray]:
    if per_sample is None:
        out = np.asarray(values(tokens, first))  # type: ignore[operator]
        if out.ndim == 0 or len(out) != len(tokens):
            raise ValueError(f"field function returned shape {out.shape} for samples "
                             f"[{first}, {first + len(tokens)}), expected [{len(tokens)}, ...]")
        return list(out)
    got = []
    for i in range(len(tokens)):
        try:
            got.append(np.asarray(next(per_sample)))
        except StopIteration:
            raise ValueError(f"field values ran out at sample {first + i}") from None
    return got


def add_sample_field(shards_dir: str | Path, name: str, values: FieldSource) -> dict:
    """Add (or replace) the per-sample field ``name`` on prepared shards; returns the new index.

    ``values`` is one array per sample in sample order, or ``fn(tokens, first) -> [n, ...]``
    called once per shard (see :data:`FieldSource`). All values must share one shape and dtype.
    The shards are verified, rewritten with the field into a temporary sibling directory (other
    files in the directory are copied along) and swapped in whole: readers never see a
    half-written field.
    """
    check_field_name(name)
    directory = Path(shards_dir)
    index, shards = read_index(directory)
    old_specs = field_specs(index)
    fields = {k: v for k, v in old_specs.items() if k != name}
    sample_len = int(index["seq_len"]) + 1
    dtype = np.dtype(index["dtype"])
    per_sample = None if callable(values) else iter(values)
    with building_dir(directory) as tmp:
        listed = {INDEX_NAME} | {s.path.name for s in shards}
        for entry in directory.iterdir():  # e.g. the cluster tree stored with the data
            if entry.name not in listed:
                copy = shutil.copytree if entry.is_dir() else shutil.copy2
                copy(entry, tmp / entry.name)
        new_spec: FieldSpec | None = None
        new_shards = []
        first = 0
        for shard in shards:
            tokens, old = load_shard(shard, sample_len, dtype, old_specs)
            new = _field_values(values, tokens, first, per_sample)
            if new_spec is None and new:
                new_spec = FieldSpec(new[0].shape, new[0].dtype)
            assert new_spec is not None
            # the same shard name, boundaries and sample keys as before
            with ShardSink(tmp, len(tokens), {**fields, name: new_spec}, first_key=first,
                           names=lambda _, n=shard.path.name: n) as sink:
                for i, sample in enumerate(tokens):
                    try:
                        sink.add(sample, {**{k: v[i] for k, v in old.items() if k != name},
                                          name: new[i]})
                    except ValueError as e:
                        raise ValueError(f"{shard.path}: field {name!r}: {e}") from e
            new_shards += sink.shards
            first += len(tokens)
        if per_sample is not None and next(per_sample, None) is not None:
            raise ValueError(f"field {name!r}: more values than the {first} samples of "
                             f"{directory}")
        assert new_spec is not None
        index = {**index, "version": INDEX_VERSION, "shards": new_shards,
                 "fields": fields_json({**fields, name: new_spec})}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return index
