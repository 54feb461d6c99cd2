"""A trained model in one process, for inference, from a checkpoint of any layout.

Checkpoints store global tensors (tp and ep shards as DTensors), so one process loads them
with ``torch.distributed.checkpoint`` and no process group. Value tables come from where
``values`` says: ``ram`` (loaded with the model), ``mmap:BANK_DIR`` (an exported bank, memory
mapped) or ``http://HOST:PORT`` (a ``memtron serve-memory`` server). The hierarchical bank's
level tables come from ``bank`` (an exported bank directory or a server URL) or, without it,
from the checkpoint; prompts reach their node ids through the cluster tree (DESIGN §5, §11).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from memtron.config import Config
from memtron.data.clustering import ClusterTree, route_texts
from memtron.infer.generate import GenerationError
from memtron.infer.values import StoreValueTable
from memtron.model.tables import LocalValueTable, TableSpec, ValueTable
from memtron.model.transformer import Transformer, build_model
from memtron.storage.bank import Bank, open_bank
from memtron.storage.checkpoint import VALUE_TABLE_KEY, CheckpointReader
from memtron.storage.manifest import CheckpointError, resolve_checkpoint
from memtron.storage.store import HttpBank, RowStore


@dataclass
class LoadedModel:
    model: Transformer
    config: Config
    checkpoint: Path
    step: int
    store_tables: list[StoreValueTable]  # empty when the tables are in RAM
    tree: Any = None  # the ClusterTree routing prompts to bank nodes (models with a bank)

    def bank_paths(self, texts: list[str]) -> torch.Tensor | None:
        """[n, levels] node ids of each text's path down the tree (None without a bank)."""
        return route_texts(self.tree, texts)

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
            and all(saved.get(k) == reader.manifest["config"].get(k)
                    for k in ("model", "memory", "bank")))
    if not same:
        raise CheckpointError(f"{bank.path}: exported from step {source.get('step')} of "
                              f"{source.get('checkpoint')}, but {reader.path} is step "
                              f"{reader.step}; export the bank from this checkpoint")


DECAY_BLOCK_ROWS = 1 << 16  # rows per block of _apply_owed_decay's fp32 temporaries


def load_tree(cfg: Config, tree: str | Path | None, bank: str | None,
              token: str | None = None) -> Any:
    """The cluster tree of a model with a bank. With a ``bank`` (dir or URL) it is the one
    :meth:`memtron.infer.bank.TreeBank.open` finds and checks (``tree``, else what the
    bank's manifest records, refusing a tree of another hash); with the blocks in RAM, ``tree``
    or the copy kept with the training data. Checked against the model's bank shape."""
    from memtron.data.prepare import TREE_DIR
    from memtron.infer.bank import TreeBank

    if bank:
        loaded = TreeBank.open(bank, tree, token).tree
    else:
        loaded = ClusterTree.load(tree if tree is not None else Path(cfg.data.train) / TREE_DIR)
    return loaded.expect_shape(cfg.bank.levels, cfg.bank.branching)


def open_bank_source(spec: str, token: str | None = None) -> Bank | HttpBank:
    """``--bank``: a bank directory or a memory server URL."""
    return open_values(spec if spec.startswith(("http://", "https://")) else f"mmap:{spec}",
                       token)


def load_model(ckpt: str | Path, values: str = "ram", cache_rows: int = 0,
               device: str | torch.device = "cpu", token: str | None = None,
               bank: str | None = None, tree: str | Path | None = None) -> LoadedModel:
    """Build the checkpoint's model in this process and load its weights (see module doc).
    ``cache_rows``: LRU rows kept on the device per store-backed table. ``bank``: where the
    hierarchical bank's blocks come from (directory or URL; default: the checkpoint);
    ``tree``: the cluster tree, if neither the bank nor the data records it."""
    path = resolve_checkpoint(Path(ckpt))
    reader = CheckpointReader(path)
    cfg = reader.config
    source = open_values(values, token)
    if isinstance(source, Bank):
        _check_bank_source(source, reader)
    blocks = open_bank_source(bank, token) if bank else None
    if isinstance(blocks, Bank):
        _check_bank_source(blocks, reader)
    stores: list[StoreValueTable] = []

    def make_table(spec: TableSpec) -> ValueTable:
        """Tables named by their spec: value tables from ``values``, tree levels from
        ``bank``, each in RAM (drawn, then loaded) where no store is given for it."""
        where, given = (source, values) if spec.kind == "values" else (blocks, bank)
        if where is None:
            return LocalValueTable(spec)
        if spec.name not in where.tables:
            raise CheckpointError(f"{given}: has no table {spec.name} (it has "
                                  f"{sorted(where.tables)})")
        store = where.table(spec.name)
        _check_table(spec.name, store, spec.rows, spec.dim, given)
        stores.append(StoreValueTable(spec, store, cache_rows))
        return stores[-1]

    # Dense weights are small; store tables hold no rows (and so have no state-dict keys).
    model = build_model(cfg, make_table)
    state = model.state_dict()
    try:
        dcp.load({"model": state}, checkpoint_id=str(path))
    except Exception as e:  # DCP raises several types; name the checkpoint either way
        raise CheckpointError(f"{path}: cannot load the model: {e}") from e
    _apply_owed_decay(model, reader)
    model = model.to(device).eval()
    tree_ = load_tree(cfg, tree, bank, token) if cfg.bank.layers and cfg.bank.levels else None
    return LoadedModel(model, cfg, path, reader.step, stores, tree_)


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

