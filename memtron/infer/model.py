"""A trained model in one process, for inference, from a checkpoint of any layout.

Checkpoints store global tensors (tp and ep shards as DTensors), so one process loads them
with ``torch.distributed.checkpoint`` and no process group. Value tables come from where
``values`` says: ``ram`` (loaded with the model), ``mmap:BANK_DIR`` (an exported bank, memory
mapped) or ``http://HOST:PORT`` (a ``memtron serve-memory`` server).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from memtron.config import Config
from memtron.infer.generate import GenerationError
from memtron.infer.store import Bank, HttpBank, RowStore, open_bank
from memtron.infer.values import StoreValueTable
from memtron.model.memory.values import STORAGE_DTYPES, LocalValueTable, ValueTable
from memtron.model.transformer import Transformer, build_model
from memtron.train.checkpoint import (
    VALUE_TABLE_KEY,
    CheckpointError,
    CheckpointReader,
    resolve_checkpoint,
)

TABLE_PREFIX = "value_tables."


@dataclass
class LoadedModel:
    model: Transformer
    config: Config
    checkpoint: Path
    step: int
    store_tables: list[StoreValueTable]  # empty when the tables are in RAM

    def fetch_stats(self) -> dict[str, float]:
        """Memory-fetch counters summed over the store-backed tables."""
        total: dict[str, float] = {}
        for table in self.store_tables:
            for key, value in table.fetch_stats().items():
                if key != "cache_hit_rate":
                    total[key] = total.get(key, 0) + value
        if total:
            total["cache_hit_rate"] = total["cache_hits"] / max(1, total["rows_requested"])
        return total


def open_values(spec: str, token: str | None = None) -> Bank | HttpBank | None:
    """``ram`` -> None; ``mmap:DIR`` -> the bank at DIR; ``http(s)://...`` -> a server."""
    if spec == "ram":
        return None
    if spec.startswith("mmap:"):
        return open_bank(Path(spec[len("mmap:"):]))
    if spec.startswith(("http://", "https://")):
        return HttpBank(spec, token=token)
    raise GenerationError(f"--values: {spec!r} is not ram, mmap:BANK_DIR or http://HOST:PORT")


def _check_table(name: str, store: RowStore, n_rows: int, dim: int, where: str) -> None:
    if (store.n_rows, store.dim) != (n_rows, dim):
        raise CheckpointError(f"{where}: table {name} is {store.n_rows} x {store.dim}, the "
                              f"checkpoint's model needs {n_rows} x {dim}")


def _check_bank_source(bank: Bank, reader: CheckpointReader) -> None:
    """Value rows only make sense with the dense weights they were trained with."""
    source = bank.manifest.get("source", {})
    saved = source.get("config", {})
    same = (source.get("step") == reader.step
            and all(saved.get(k) == reader.manifest["config"][k] for k in ("model", "memory")))
    if not same:
        raise CheckpointError(f"{bank.path}: exported from step {source.get('step')} of "
                              f"{source.get('checkpoint')}, but {reader.path} is step "
                              f"{reader.step}; export the bank from this checkpoint")


DECAY_BLOCK_ROWS = 1 << 16  # rows per block of _apply_owed_decay's fp32 temporaries


def load_model(ckpt: str | Path, values: str = "ram", cache_rows: int = 0,
               device: str | torch.device = "cpu", token: str | None = None) -> LoadedModel:
    """Build the checkpoint's model in this process and load its weights (see module doc).
    ``cache_rows``: LRU rows kept on the device per store-backed table."""
    path = resolve_checkpoint(Path(ckpt))
    reader = CheckpointReader(path)
    cfg = reader.config
    source = open_values(values, token)
    if isinstance(source, Bank):
        _check_bank_source(source, reader)
    stores: list[StoreValueTable] = []

    def make_table(n_rows: int, dim: int, seed: int) -> ValueTable:
        if source is None:
            return LocalValueTable(n_rows, dim, seed,
                                   dtype=STORAGE_DTYPES[cfg.memory.value_dtype])
        name = f"table{len(stores)}"  # the Transformer names its tables in creation order
        if name not in source.tables:
            raise CheckpointError(f"{values}: has no table {name} (it has "
                                  f"{sorted(source.tables)})")
        store = source.table(name)
        _check_table(name, store, n_rows, dim, values)
        stores.append(StoreValueTable(store, cache_rows))
        return stores[-1]

    model = build_model(cfg, make_table)  # dense weights are small; store tables hold no rows
    state = {k: v for k, v in model.state_dict().items()
             if source is None or not k.startswith(TABLE_PREFIX)}
    try:
        dcp.load({"model": state}, checkpoint_id=str(path))
    except Exception as e:  # DCP raises several types; name the checkpoint either way
        raise CheckpointError(f"{path}: cannot load the model: {e}") from e
    _apply_owed_decay(model, reader)
    model = model.to(device).eval()
    return LoadedModel(model, cfg, path, reader.step, stores)


def _apply_owed_decay(model: Transformer, reader: CheckpointReader) -> None:
    """Decay owed by rows of tables trained with global weight decay (saved undecayed, see
    ``CheckpointReader.owed_decay``), written into the loaded rows, in blocks of rows."""
    for name, table in model.value_tables.items():
        if not isinstance(table, LocalValueTable):
            continue  # store tables: banks are exported from decayed rows
        weight = table.weight.detach()
        for start in range(0, table.n_rows, DECAY_BLOCK_ROWS):
            stop = min(table.n_rows, start + DECAY_BLOCK_ROWS)
            factors = reader.owed_decay(f"{VALUE_TABLE_KEY}{name}.weight", start, stop)
            if factors is None:
                break
            weight[start:stop] = weight[start:stop].float().mul_(factors.unsqueeze(1))

