"""Checkpoint tensors by row range, through torch's public DCP API only (DESIGN §9, §12).

Checkpoints are ``torch.distributed.checkpoint`` directories (written by
:mod:`memtron.train.checkpoint`). Two planners make them readable by rows in bounded memory
without touching DCP's file format:

* :class:`ChunkedSavePlanner` (the writer's planner) stores every tensor as chunks of at most
  :data:`CHUNK_BYTES` along dim 0 (a rank's shard of a table becomes many chunks). DCP reshards
  across any chunking, so training loads them at any layout as before.
* :class:`CheckpointReader` loads a row range with ``dcp.load`` in one process (``no_dist``),
  through a :class:`~torch.distributed.checkpoint.FileSystemReader` and a load planner whose
  read items (``create_read_items_for_chunk_list``) cover just the rows asked for. DCP reads a
  stored chunk whole, so memory holds the rows asked for plus one chunk. A chunk bigger than
  :data:`CHUNK_BYTES` (a checkpoint written before the chunking) is loaded once and kept until
  the reader moves past it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from memtron.config import Config, config_from_dict
from memtron.storage.manifest import (
    CheckpointError,
    read_manifest,
    resolve_checkpoint,
    verify_checkpoint,
)

# Stored chunks hold at most this many bytes (at least one row): a row-range read loads one.
CHUNK_BYTES = 4 << 20
VALUE_TABLE_KEY = "model.value_tables."  # + "<table>.weight"


class ChunkedSavePlanner(DefaultSavePlanner):
    """DCP's default save plan with every tensor write item cut along dim 0 into chunks of at
    most ``chunk_bytes``, so that readers can load a row range without loading a whole shard."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__()
        self.chunk_bytes = chunk_bytes
        self._pieces: dict[MetadataIndex, tuple[WriteItem, int, int]] = {}

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        self.plan = dataclasses.replace(plan, items=[p for item in plan.items
                                                     for p in self._split(item)])
        return self.plan

    def _split(self, item: WriteItem) -> list[WriteItem]:
        data = item.tensor_data
        if item.type == WriteItemType.BYTE_IO or data is None or not data.chunk.sizes:
            return [item]
        sizes, offsets = data.chunk.sizes, data.chunk.offsets
        row_bytes = math.prod(sizes[1:]) * data.properties.dtype.itemsize
        step = max(1, self.chunk_bytes // max(1, row_bytes))
        if sizes[0] <= step:
            return [item]
        pieces = []
        for row in range(0, sizes[0], step):
            rows = min(step, sizes[0] - row)
            at = torch.Size([offsets[0] + row, *offsets[1:]])
            chunk = ChunkStorageMetadata(offsets=at, sizes=torch.Size([rows, *sizes[1:]]))
            piece = dataclasses.replace(item, index=MetadataIndex(item.index.fqn, at),
                                        type=WriteItemType.SHARD,  # one of several chunks
                                        tensor_data=dataclasses.replace(data, chunk=chunk))
            self._pieces[piece.index] = (item, row, rows)
            pieces.append(piece)
        return pieces

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.index in self._pieces:
            whole, row, rows = self._pieces[write_item.index]
            return super().resolve_data(whole).narrow(0, row, rows)
        return super().resolve_data(write_item)


class _RegionPlanner(LoadPlanner):
    """Loads given read items into given destination tensors, one per local chunk (keyed by
    the chunk's global offsets): no state dict walk, no process group."""

    def __init__(self, items: list[ReadItem], dests: dict[tuple[int, ...], torch.Tensor]) -> None:
        self.items, self.dests = items, dests

    def set_up_planner(self, state_dict: Any, metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan(self.items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise CheckpointError(f"{read_item.dest_index.fqn}: not a tensor")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.dests[tuple(read_item.dest_index.offset or ())]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class _MetadataOnce(FileSystemReader):
    """A FileSystemReader that reads ``.metadata`` once, not at every ``dcp.load``."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._metadata = super().read_metadata()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata


class CheckpointReader:
    """Reads a checkpoint saved at any layout in one process, with no process group.

    Keys are the single-process names DCP stores (``model.blocks.0.attn.wq.weight``,
    ``model.value_tables.table0.weight``, ``optim.*``, ``memory_optim.*``); tensors come back
    whole (:meth:`read`) or by rows (:meth:`read_rows`, :meth:`iter_rows`), loaded by
    ``dcp.load`` (see the module docstring). Checksums are verified on opening (``verify``),
    naming the file that fails.
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = resolve_checkpoint(path)
        self.manifest = read_manifest(self.path)
        if verify:
            verify_checkpoint(self.path, self.manifest)
        try:
            self._storage = _MetadataOnce(self.path)
        except Exception as e:  # pickle and OS errors
            raise CheckpointError(f"{self.path / '.metadata'}: unreadable ({e})") from e
        metadata = self._storage.read_metadata()
        self._tensors = {k: v for k, v in metadata.state_dict_metadata.items()
                         if isinstance(v, TensorStorageMetadata)}
        self._files = {index: info.relative_path for index, info in
                       metadata.storage_data.items()}
        self._whole: tuple[tuple[str, tuple[int, ...]], torch.Tensor] | None = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._whole = None

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
            out = torch.empty((), dtype=meta.properties.dtype)
            self._load(key, meta, ChunkStorageMetadata(torch.Size([]), torch.Size([])), out)
            return out
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
        if stop > start:
            self._fill_rows(key, meta, start, stop, out)
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

    # -- loading ---------------------------------------------------------------------------
    def _fill_rows(self, key: str, meta: TensorStorageMetadata, start: int, stop: int,
                   out: torch.Tensor) -> None:
        """Chunks of at most CHUNK_BYTES are read for just these rows, in one ``dcp.load``;
        bigger ones are loaded whole once and copied from."""
        small = []
        for chunk in meta.chunks:
            first, rows = chunk.offsets[0], chunk.sizes[0]
            lo, hi = max(start, first), min(stop, first + rows)
            if lo >= hi:
                continue
            if math.prod(chunk.sizes) * meta.properties.dtype.itemsize <= CHUNK_BYTES:
                small.append(chunk)
                continue
            columns = (slice(o, o + s) for o, s in zip(chunk.offsets[1:], chunk.sizes[1:]))
            out[(slice(lo - start, hi - start), *columns)].copy_(
                self._whole_chunk(key, meta, chunk)[lo - first : hi - first])
        if small:
            region = ChunkStorageMetadata(torch.Size([start, *[0] * (len(meta.size) - 1)]),
                                          torch.Size([stop - start, *meta.size[1:]]))
            self._load(key, dataclasses.replace(meta, chunks=small), region, out)

    def _whole_chunk(self, key: str, meta: TensorStorageMetadata,
                     chunk: ChunkStorageMetadata) -> torch.Tensor:
        """A big stored chunk, loaded whole (the last one is kept, so row blocks reuse it)."""
        where = (key, tuple(chunk.offsets))
        if self._whole is None or self._whole[0] != where:
            self._whole = None  # free the previous chunk before loading the next
            tensor = torch.empty(chunk.sizes, dtype=meta.properties.dtype)
            self._load(key, dataclasses.replace(meta, chunks=[chunk]), chunk, tensor)
            self._whole = (where, tensor)
        return self._whole[1]

    def _load(self, key: str, meta: TensorStorageMetadata, region: ChunkStorageMetadata,
              dest: torch.Tensor) -> None:
        """``dcp.load`` of the global ``region`` of ``key`` into ``dest``, from the stored
        chunks listed in ``meta``."""
        items = create_read_items_for_chunk_list(key, meta, [region])
        planner = _RegionPlanner(items, {tuple(region.offsets): dest})
        try:
            with warnings.catch_warnings():  # one process is what is asked for here
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load({key: dest}, storage_reader=self._storage, planner=planner,
                         no_dist=True)
        except (Exception, CheckpointException) as e:  # name the files whatever DCP raises
            files = sorted({self._files.get(i.storage_index, "?") for i in items})
            raise CheckpointError(f"{self.path}: cannot read {key} from "
                                  f"{', '.join(str(self.path / f) for f in files)}: "
                                  f"{e}") from e
