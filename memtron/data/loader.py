"""Resumable stream of batches from prepared shards, split by data-parallel rank.

A batch is a :class:`Batch`: the tokens ``[B, seq_len + 1]`` and the per-sample fields the
shards carry (``bank_path``, ``memory_ids``...; format in :mod:`memtron.data.shards`). Fields
travel with their sample's row, so everything below holds for them as for the tokens.

Design (the whole of it):
  * Epoch order: per epoch, the shard order is permuted from ``(seed, epoch)`` and the rows
    inside each shard from ``(seed, epoch, shard)``; the epoch order is their concatenation
    (identity when ``shuffle=False``). It is a pure function, so nothing but a counter needs
    saving, and a reader only ever holds the one or two shards it is walking through.
  * DP split, at sample level, by global batch: global batch b is the slice
    ``[b*G, (b+1)*G)`` of the epoch order, ``G = micro_batch_size * dp_size``, and rank r takes
    its rows ``[r*B, (r+1)*B)``. The dp ranks' batches together are exactly the batch one
    process with ``micro_batch_size = G`` would read, which is what makes data parallelism
    equal to single-process training. Works with any number of shards (even one); the epoch
    remainder smaller than one global batch is dropped.
  * Workers split the *rank's batch sequence*: worker w of W produces batches w, w+W, ...
    and torch's DataLoader hands them out round-robin, i.e. in order. The stream is therefore
    the same for any ``num_workers`` (0 included), and the state is one number: the batches
    handed to the caller. Batches prefetched by workers but not yet handed out are not counted.
    (Each worker reads its rank's shards itself; the page cache makes that one disk read.)
  * Resume: the state is the number of samples consumed from the epoch stream, the same on
    every dp rank, so saving rank 0's is enough. A state loads into any layout with the same
    global batch size G (dp_size and micro_batch_size may change, e.g. from dp=2 to one
    process with twice the micro-batch), and ``num_workers`` may change freely; seed,
    shuffle, seq_len and the data set must match (else DataError).
"""

from __future__ import annotations

import hashlib
import itertools
import traceback
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memtron.data.shards import (  # noqa: F401 (DataError: re-exported for callers)
    INDEX_NAME,
    DataError,
    field_specs,
    load_shard,
    read_index,
)

STATE_VERSION = 2
SHARDS_CACHED = 2  # a batch can straddle two shards; more would only cost memory


@dataclass
class Batch:
    """One micro-batch: ``tokens`` ``LongTensor[B, seq_len + 1]`` (inputs and shifted targets)
    and the samples' named per-sample ``fields`` (e.g. ``bank_path`` ``[B, levels]``), each
    ``[B, *shape]``. Integer fields arrive as int64, others in their stored dtype."""

    tokens: torch.Tensor
    fields: dict[str, torch.Tensor] = dataclass_field(default_factory=dict)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(self.tokens.to(device, non_blocking=non_blocking),
                     {k: v.to(device, non_blocking=non_blocking)
                      for k, v in self.fields.items()})


def _field_tensor(values: np.ndarray) -> torch.Tensor:
    if values.dtype.kind in "ui":
        return torch.from_numpy(values.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(values))


class _BatchReader:
    """Batch number t of one dp rank's stream (epochs concatenated) -> a LongTensor."""

    def __init__(self, path: str | Path, micro_batch_size: int, seq_len: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool):
        if micro_batch_size < 1 or seq_len < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and seq_len ({seq_len}) "
                             "must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.index, self.shards = read_index(path, seq_len)
        self.fields = field_specs(self.index)
        self.index_path = Path(path) / INDEX_NAME
        self.sample_len = seq_len + 1
        self.dtype = np.dtype(self.index["dtype"])
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.n_samples = int(self.index["n_samples"])
        self.global_batch_size = micro_batch_size * dp_size
        self.rank_offset = dp_rank * micro_batch_size
        self.batches_per_epoch = self.n_samples // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.index_path}: {self.n_samples} samples cannot fill one global batch "
                f"(dp_size={dp_size} x micro_batch_size={micro_batch_size})"
            )
        # Identifies the data set in saved states: resuming on other data is refused. It hashes
        # the tokens alone where the index records them, so adding a per-sample field (e.g.
        # `data retrieve` between the two training stages) keeps a run resumable; whole-file
        # hashes of older indexes are still accepted.
        self.legacy_fingerprint = _digest(s.sha256 for s in self.shards)
        self.fingerprint = self.legacy_fingerprint
        if all(s.tokens_sha256 for s in self.shards):
            self.fingerprint = _digest(f"tokens:{s.tokens_sha256}" for s in self.shards)
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None
        # (epoch, shard) -> (tokens, fields, row order)
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, dict[str, np.ndarray],
                                                        np.ndarray]] = OrderedDict()

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard visiting order of an epoch and where each starts in the epoch order."""
        if self._layout is None or self._layout[0] != epoch:
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, 0]).permutation(order)
            sizes = np.array([self.shards[i].n_samples for i in order], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            self._layout = (epoch, order, starts)
        return self._layout[1], self._layout[2]

    def _shard_rows(self, epoch: int,
                    shard: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(tokens, fields, row order) of a shard in an epoch, from the small LRU cache."""
        key = (epoch, shard)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        cached = next((v for (_, s), v in self._cache.items() if s == shard), None)
        samples, fields = cached[:2] if cached else load_shard(
            self.shards[shard], self.sample_len, self.dtype, self.fields)
        rows = np.arange(len(samples))
        if self.shuffle:
            rows = np.random.default_rng([self.seed, epoch, 1, shard]).permutation(rows)
        self._cache[key] = (samples, fields, rows)
        while len(self._cache) > SHARDS_CACHED:
            self._cache.popitem(last=False)
        return samples, fields, rows

    def batch(self, t: int) -> Batch:
        epoch, b = divmod(t, self.batches_per_epoch)
        order, starts = self._epoch_layout(epoch)
        positions = (b * self.global_batch_size + self.rank_offset
                     + np.arange(self.micro_batch_size))
        slots = np.searchsorted(starts, positions, side="right") - 1
        out = np.empty((self.micro_batch_size, self.sample_len), dtype=np.int64)
        fields = {name: np.empty((self.micro_batch_size, *spec.shape), dtype=spec.dtype)
                  for name, spec in self.fields.items()}
        for slot in np.unique(slots):
            mask = slots == slot
            samples, shard_fields, rows = self._shard_rows(epoch, int(order[slot]))
            picked = rows[positions[mask] - starts[slot]]
            out[mask] = samples[picked]
            for name, values in shard_fields.items():
                fields[name][mask] = values[picked]
        return Batch(torch.from_numpy(out), {k: _field_tensor(v) for k, v in fields.items()})


class _WorkerStream(IterableDataset):
    """Inside DataLoader worker w of W: batches first + w, first + w + W, ... forever."""

    def __init__(self, reader: _BatchReader, first_batch: int):
        self.reader = reader
        self.first_batch = first_batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        t = self.first_batch + worker
        while True:
            yield self.reader.batch(t)
            t += n_workers


class ShardLoader:
    """Endless, resumable :class:`Batch` es (``tokens`` ``[micro_batch_size, seq_len + 1]`` and
    the shards' per-sample fields) for one dp rank.

    See the module docstring for the split and resume design. Iterate one iterator at a time:
    each ``iter()`` continues from the batches handed out so far, so call ``load_state_dict``
    before ``iter()``. ``index`` is the parsed ``index.json`` (tokenizer, vocab_size, eos_id...),
    for checks against the model config.
    """

    def __init__(
        self,
        path: str | Path,
        micro_batch_size: int,
        seq_len: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._reader = _BatchReader(path, micro_batch_size, seq_len, dp_rank, dp_size, seed,
                                    shuffle)
        self.index: dict = self._reader.index
        self.num_workers = num_workers
        self.dp_size = dp_size
        self.seq_len = seq_len
        self.batches_per_epoch = self._reader.batches_per_epoch
        self._batches_yielded = 0

    @property
    def epoch(self) -> int:
        return self._batches_yielded // self.batches_per_epoch

    @property
    def fields(self) -> dict[str, tuple[int, ...]]:
        """Per-sample field name -> shape of what each batch carries in ``Batch.fields``."""
        return {name: spec.shape for name, spec in self._reader.fields.items()}

    def __iter__(self) -> Iterator[Batch]:
        batches: Iterable[Batch]
        if self.num_workers == 0:
            batches = map(self._reader.batch, itertools.count(self._batches_yielded))
        else:
            batches = DataLoader(_WorkerStream(self._reader, self._batches_yielded),
                                 batch_size=None, num_workers=self.num_workers)
        try:
            for batch in batches:
                self._batches_yielded += 1  # counted when handed over, never when prefetched
                yield batch
        except Exception as error:
            # torch re-raises a worker's error from frames that hold its iterator in a
            # reference cycle; left to the garbage collector, its workers take 10 s to stop.
            traceback.clear_frames(error.__traceback__)
            raise

    def state_dict(self) -> dict:
        """JSON-serialisable position after the batches already handed to the caller."""
        reader = self._reader
        return {
            "version": STATE_VERSION,
            "samples_consumed": self._batches_yielded * reader.global_batch_size,
            "epoch": self.epoch,
            "global_batch_size": reader.global_batch_size,
            "seed": reader.seed,
            "shuffle": reader.shuffle,
            "seq_len": self.seq_len,
            "dataset": reader.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the saved position (num_workers may differ from the save)."""
        expected = self.state_dict()
        for key in ("version", "seed", "shuffle", "global_batch_size", "seq_len", "dataset",
                    "samples_consumed"):
            if key not in state:
                raise DataError(f"loader state: missing key {key!r}")
            same = state[key] == expected[key] or (
                key == "dataset" and state[key] == self._reader.legacy_fingerprint)
            if key != "samples_consumed" and not same:
                raise DataError(
                    f"loader state: {key!r} is {state[key]!r} but this loader has "
                    f"{expected[key]!r} ({self._reader.index_path}); exact resume needs the "
                    "same seed, shuffle, global batch (dp_size x micro_batch_size), seq_len "
                    "and data"
                )
        self._batches_yielded = int(state["samples_consumed"]) // self._reader.global_batch_size


def _digest(parts: Iterable[str]) -> str:
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def eval_batches(
    path: str | Path,
    micro_batch_size: int,
    seq_len: int,
    n_batches: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> Iterator[Batch]:
    """The first ``n_batches`` batches of this rank's unshuffled pass: the same every call.

    Stops early (at the same batch on every rank) when the pass holds fewer batches.
    """
    reader = _BatchReader(path, micro_batch_size, seq_len, dp_rank, dp_size, seed=0,
                          shuffle=False)
    return (reader.batch(t) for t in range(min(n_batches, reader.batches_per_epoch)))
