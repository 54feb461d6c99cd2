"""Tree-memory blocks at inference: text -> cluster-tree path -> the path's node rows, from
the on-disk bank the tree memory was exported to, or a memory server (DESIGN §5, §11).

Bank layout (what ``memtron export bank`` writes for a hierarchical model): one table per tree
level, ``bank0`` ... ``bank{levels-1}`` (:func:`level_table`), where row ``i`` of level ``l``'s
table (0-based ``l``) is node ``level_offset + i`` of the tree, i.e. node ids are level-major
without the root (:mod:`memtron.data.clustering`). A row holds that node's blocks of every bank
layer, flattened; this module does not look inside rows.

``memtron export bank`` records this in the manifest as ``source.bank``: ``tables`` (per
level), ``offsets`` (first node id per level), ``tree`` (the tree directory) and
``tree_sha256`` (of the tree's manifest); a bank without it falls back to the ``bank{l}``
names and the tree's own offsets.

The tree that routes prompts is, in order: the ``tree`` argument (``--tree``);
``source.bank.tree``; ``source.tree`` (relative to the bank directory or absolute); the copy
that ``prepare --clusters`` keeps in the training data ``source.config.data.train``. When the
manifest records ``tree_sha256``, any other tree is refused. A memory server publishes no
manifest, so a URL bank needs the tree given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtron.data.clustering import TREE_MANIFEST, ClusterTree
from memtron.data.shards import INDEX_NAME
from memtron.storage.bank import open_bank
from memtron.storage.manifest import sha256_file
from memtron.storage.rowblock import BANK_MANIFEST, BankError
from memtron.storage.store import HttpBank, RowStore

TABLE_PREFIX = "bank"  # the model's level tables: model/memory/hierarchical.py table_name


def level_table(level: int) -> str:
    """Table name of tree level ``level`` (0-based, as the model numbers its tables)."""
    return f"{TABLE_PREFIX}{level}"


@dataclass
class PathBlocks:
    """What one text fetched: its path (node ids, root to leaf), and per level the table, the
    row within it, the row itself and its size in bytes."""

    text: str
    path: list[int]
    tables: list[str]
    rows: list[int]
    blocks: list[torch.Tensor]

    @property
    def nbytes(self) -> list[int]:
        return [b.numel() * b.element_size() for b in self.blocks]


class TreeBank:
    """The tree memory's bank: its level tables (any :class:`RowStore` backend) plus the tree
    that routes text to them."""

    def __init__(self, stores: Sequence[RowStore], tree: ClusterTree, where: str = "bank"):
        if len(stores) != tree.levels:
            raise BankError(f"{where}: {len(stores)} level tables, the tree has {tree.levels} "
                            "levels")
        for level, (store, n) in enumerate(zip(stores, tree.nodes_per_level(), strict=True)):
            if store.n_rows != n:
                raise BankError(f"{where}: table {level_table(level)} has {store.n_rows} rows, "
                                f"level {level + 1} of the tree ({tree.levels} x "
                                f"{tree.branching}) has {n} nodes")
        self.stores, self.tree, self.where = list(stores), tree, where

    @classmethod
    def open(cls, bank: str | Path, tree: str | Path | None = None,
             token: str | None = None) -> TreeBank:
        """``bank``: a bank directory or a ``memtron serve-memory`` URL; ``tree``: the tree
        directory, when the bank does not say where it is (see the module docstring)."""
        where = str(bank)
        if where.startswith(("http://", "https://")):
            remote = HttpBank(where, token=token)
            if tree is None:
                raise BankError(f"{where}: a memory server does not say which tree routes to "
                                "its blocks; give the tree directory (--tree)")
            return cls(_level_stores(remote, remote.tables, where), ClusterTree.load(tree),
                       where)
        local = open_bank(bank)
        source = local.manifest.get("source") or {}
        info = source.get("bank") or {}
        tree_dir = Path(tree) if tree is not None else _tree_from_manifest(local.path, source)
        expected = info.get("tree_sha256")
        if expected and sha256_file(tree_dir / TREE_MANIFEST) != expected:
            raise BankError(f"{tree_dir}: not the tree the bank {where} was exported with "
                            "(source.bank.tree_sha256 differs)")
        loaded = ClusterTree.load(tree_dir)
        offsets = info.get("offsets")
        if offsets is not None and offsets != [loaded.level_offset(level) for level
                                               in range(1, loaded.levels + 1)]:
            raise BankError(f"{where}: level offsets {offsets} do not match the tree "
                            f"{tree_dir} ({loaded.levels} x {loaded.branching})")
        names = info.get("tables")
        missing = [name for name in names or [] if name not in local.tables]
        if missing:
            raise BankError(f"{where}: source.bank lists tables {missing} the bank lacks")
        stores = ([local.table(name) for name in names] if names
                  else _level_stores(local, local.tables, where))
        return cls(stores, loaded, where)

    def paths(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, levels]`` node ids of each text's path."""
        return self.tree.route(texts)

    def fetch_paths(self, paths: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """Per level, the rows ``[n, dim_l]`` of the nodes of ``paths`` ``[n, levels]``: one
        fetch per level for the whole batch."""
        paths = torch.as_tensor(np.asarray(paths), dtype=torch.int64)
        if paths.dim() != 2 or paths.shape[1] != self.tree.levels:
            raise ValueError(f"paths of shape {list(paths.shape)}, expected [n, "
                             f"{self.tree.levels}]")
        out = []
        for level, store in enumerate(self.stores):
            rows = paths[:, level] - self.tree.level_offset(level + 1)
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= store.n_rows):
                raise ValueError(f"paths: column {level} holds node ids outside level "
                                 f"{level + 1} of the tree")
            out.append(store.fetch(rows))
        return out

    def fetch(self, texts: Sequence[str]) -> list[PathBlocks]:
        """Route each text and fetch its path's blocks."""
        paths = self.paths(texts)
        rows = self.fetch_paths(paths)
        offsets = [self.tree.level_offset(level) for level in range(1, self.tree.levels + 1)]
        return [PathBlocks(text, paths[i].tolist(),
                           [level_table(level) for level in range(self.tree.levels)],
                           [int(paths[i, level]) - offsets[level]
                            for level in range(self.tree.levels)],
                           [level_rows[i] for level_rows in rows])
                for i, text in enumerate(texts)]


def _level_stores(bank: Any, tables: list[str], where: str) -> list[RowStore]:
    levels = [t for t in tables if t.startswith(TABLE_PREFIX)
              and t.removeprefix(TABLE_PREFIX).isdigit()]
    if not levels:
        raise BankError(f"{where}: no hierarchical level tables ({level_table(0)}, "
                        f"{level_table(1)}, ...); tables: {tables}")
    expected = [level_table(level) for level in range(len(levels))]
    if sorted(levels) != sorted(expected):
        raise BankError(f"{where}: level tables {sorted(levels)} are not {expected}")
    return [bank.table(name) for name in expected]


def _tree_from_manifest(bank_dir: Path, source: dict[str, Any]) -> Path:
    where = bank_dir / BANK_MANIFEST
    if (source.get("bank") or {}).get("tree"):
        return Path(source["bank"]["tree"])
    if source.get("tree"):
        tree = Path(source["tree"])
        return tree if tree.is_absolute() else bank_dir / tree
    train = ((source.get("config") or {}).get("data") or {}).get("train")
    if train:
        index_path = Path(train) / INDEX_NAME
        try:
            clusters = json.loads(index_path.read_text()).get("clusters")
        except (OSError, ValueError) as e:
            raise BankError(f"{where}: names no tree and its training data {index_path} is "
                            f"unreadable ({e}); give the tree directory (--tree)") from e
        if clusters and clusters.get("tree"):
            return Path(train) / clusters["tree"]
        raise BankError(f"{where}: names no tree and its training data {train} was not "
                        "prepared with --clusters; give the tree directory (--tree)")
    raise BankError(f"{where}: names no tree (source.tree) and no training data; give the "
                    "tree directory (--tree)")
