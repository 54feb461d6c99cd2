"""Checkpoint -> on-disk row-block bank (DESIGN §9, §11).

:func:`export_bank` writes a checkpoint's value tables as a bank (:mod:`memtron.storage.bank`),
so inference can memory-map a value table far larger than RAM or serve it with
``memtron serve-memory``. Rows are read through
:class:`~memtron.storage.checkpoint.CheckpointReader`, so no table is ever held whole: memory
stays at one read block (:data:`READ_BYTES`) and one stored chunk whatever the table or
block-file size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from memtron.storage.bank import DEFAULT_BLOCK_BYTES, BankError, TableRows, write_bank
from memtron.storage.checkpoint import CheckpointReader
from memtron.storage.manifest import sha256_file

READ_BYTES = 4 << 20  # rows read from a checkpoint at a time
VALUE_TABLE_PREFIX = "model.value_tables."


def _read_blocks(reader: CheckpointReader, key: str) -> Iterator[torch.Tensor]:
    """The rows of ``key``, :data:`READ_BYTES` at a time, refilling one buffer (fresh blocks
    would leave freed chunks for the allocator to hold on to)."""
    n_rows, dim = reader.shape(key)
    step = max(1, READ_BYTES // (dim * reader.dtype(key).itemsize))
    buffer = torch.empty(min(step, n_rows), dim, dtype=reader.dtype(key))
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        yield reader.read_rows(key, start, stop, out=buffer[: stop - start])


def bank_source(config: dict[str, Any], tree: str | Path | None) -> dict[str, Any] | None:
    """The hierarchical bank's entry of a bank manifest's ``source`` (None without a bank):
    its shape, its level tables (row i of ``bank{l}`` = node ``offsets[l] + i``), and the
    cluster tree that routes prompts to node ids, with the sha256 of the tree's manifest.
    ``tree``: the tree directory; default: the copy ``prepare --clusters`` keeps with the
    training data (``data.train/tree``), if present."""
    bank = config.get("bank") or {}
    if not bank.get("layers"):
        return None
    from memtron.data.clustering import TREE_MANIFEST
    from memtron.data.prepare import TREE_DIR
    from memtron.model.memory.hierarchical import level_offsets, table_name

    nodes = [bank["branching"] ** (level + 1) for level in range(bank["levels"])]
    entry: dict[str, Any] = {
        "levels": bank["levels"], "branching": bank["branching"], "layers": bank["layers"],
        "block_sizes": bank["block_sizes"], "d_model": config["model"]["d_model"],
        "tables": [table_name(level) for level in range(bank["levels"])],
        "offsets": level_offsets(nodes), "tree": None, "tree_sha256": None}
    tree = Path(tree) if tree is not None else Path(config["data"]["train"]) / TREE_DIR
    if (tree / TREE_MANIFEST).is_file():
        entry["tree"] = str(tree.resolve())
        entry["tree_sha256"] = sha256_file(tree / TREE_MANIFEST)
    return entry


def export_bank(ckpt: str | Path, out: str | Path, block_bytes: int = DEFAULT_BLOCK_BYTES,
                overwrite: bool = False, tree: str | Path | None = None) -> dict[str, Any]:
    """Write every value table of checkpoint ``ckpt`` (a checkpoint or run directory) as a bank
    at ``out``, in the dtype it was saved in; returns the manifest, whose ``source`` records the
    checkpoint's path, step and config so a loader can check the bank matches its model.
    Hierarchical-bank level tables are among them (rows addressed by node); ``source["bank"]``
    (:func:`bank_source`) records how node ids map to rows and which tree routes prompts."""
    with CheckpointReader(ckpt) as reader:
        keys = [k for k in reader.keys(VALUE_TABLE_PREFIX) if k.endswith(".weight")]
        if not keys:
            raise BankError(f"{reader.path}: no value tables ({VALUE_TABLE_PREFIX}*.weight)")
        tables = {}
        for key in keys:
            shape, dtype = reader.shape(key), reader.dtype(key)
            if len(shape) != 2:
                raise BankError(f"{reader.path}: {key} has shape {list(shape)}, not [N, d]")
            name = key.removeprefix(VALUE_TABLE_PREFIX).removesuffix(".weight")
            tables[name] = TableRows(shape[0], shape[1], dtype, _read_blocks(reader, key))
        source = {"checkpoint": str(reader.path.resolve()), "step": reader.step,
                  "config": reader.manifest["config"]}
        hierarchical = bank_source(reader.manifest["config"], tree)
        if hierarchical is not None:
            source["bank"] = hierarchical
        return write_bank(out, tables, source, block_bytes, overwrite)
