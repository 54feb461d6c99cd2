"""`memtron fetch`: text -> cluster-tree path -> the path's level-table rows, from an on-disk
bank (tree found through the manifest) or a memory server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memtron.cli import main
from memtron.data.clustering import build_tree
from memtron.data.embed import HashedNgramEmbedder
from memtron.data.prepare import prepare
from memtron.data.synthetic import generate_corpus
from memtron.infer.bank import TreeBank, level_table
from memtron.infer.server import running_server
from memtron.storage.bank import TableRows, write_bank
from memtron.storage.manifest import sha256_file
from memtron.storage.rowblock import BankError

DIMS = (6, 10)  # row width of level 0 and level 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch")
    generate_corpus(root / "synth", seed=5, n_entities=40, n_train_docs=200, n_valid_docs=10,
                    questions_per_bucket=5)
    raw = root / "synth" / "raw" / "train.jsonl"
    docs = [json.loads(line)["text"] for line in raw.read_text().splitlines()]
    tree = build_tree(docs, 2, 4, HashedNgramEmbedder(dim=32), seed=0)
    tree.save(root / "tree")
    return root, raw, docs, tree


def _rows(tree, level: int) -> torch.Tensor:
    """Level table whose row i holds node id (offset + i) in every column plus the column."""
    n = tree.nodes_per_level()[level]
    ids = torch.arange(n, dtype=torch.float32) + tree.level_offset(level + 1)
    return ids[:, None] * 100 + torch.arange(DIMS[level], dtype=torch.float32)


def _write(path, tree, source, sizes=None) -> None:
    tables = {}
    for level in range(tree.levels):
        rows = _rows(tree, level)[: (sizes or {}).get(level)]
        tables[level_table(level)] = TableRows(rows.shape[0], rows.shape[1], rows.dtype,
                                               rows.split(3))
    write_bank(path, tables, source=source, block_bytes=3 * 4 * 6)


def _check(fetched, tree, docs) -> None:
    assert [f.path for f in fetched] == tree.route(docs).tolist()
    for f in fetched:
        assert f.tables == ["bank0", "bank1"]
        assert f.rows == [f.path[0], f.path[1] - 4]
        for level, block in enumerate(f.blocks):
            assert torch.equal(block, f.path[level] * 100
                               + torch.arange(DIMS[level], dtype=torch.float32))
        assert f.nbytes == [4 * DIMS[0], 4 * DIMS[1]]


def test_fetch_from_disk_with_the_tree_the_manifest_names(setup):
    root, _, docs, tree = setup
    _write(root / "bank", tree, {"tree": "../tree"})  # relative to the bank directory
    bank = TreeBank.open(root / "bank")
    _check(bank.fetch(docs[:7]), tree, docs[:7])
    assert [s.stats["requests"] for s in bank.stores] == [1, 1]  # one fetch per level
    batch = bank.fetch_paths(tree.route(docs[:3]))
    assert [b.shape for b in batch] == [(3, DIMS[0]), (3, DIMS[1])]
    with pytest.raises(ValueError, match="outside level 2"):
        bank.fetch_paths(np.array([[0, 2]]))


def test_export_bank_source_entry_pins_the_tree(setup, tmp_path):
    """``memtron export bank`` records ``source.bank``: tables, offsets, tree and its hash."""
    root, _, docs, tree = setup
    entry = {"tables": ["bank0", "bank1"], "offsets": [0, 4], "tree": str(root / "tree"),
             "tree_sha256": sha256_file(root / "tree" / "tree.json")}
    _write(tmp_path / "bank", tree, {"bank": entry})
    _check(TreeBank.open(tmp_path / "bank").fetch(docs[:4]), tree, docs[:4])
    build_tree(docs, 2, 4, HashedNgramEmbedder(dim=32), seed=1).save(tmp_path / "other")
    with pytest.raises(BankError, match="not the tree the bank"):
        TreeBank.open(tmp_path / "bank", tree=tmp_path / "other")
    _write(tmp_path / "bad", tree, {"bank": {**entry, "tables": ["bank0", "bank7"]}})
    with pytest.raises(BankError, match=r"lacks|\['bank7'\]"):
        TreeBank.open(tmp_path / "bad")
    _write(tmp_path / "off", tree, {"bank": {**entry, "offsets": [0, 3]}})
    with pytest.raises(BankError, match=r"offsets \[0, 3\]"):
        TreeBank.open(tmp_path / "off")


def test_tree_found_through_the_training_data(setup, tmp_path):
    root, raw, docs, tree = setup
    prepare([raw], tmp_path / "data", seq_len=31, clusters=root / "tree")
    _write(tmp_path / "bank", tree, {"config": {"data": {"train": str(tmp_path / "data")}}})
    _check(TreeBank.open(tmp_path / "bank").fetch(docs[:3]), tree, docs[:3])

    prepare([raw], tmp_path / "plain", seq_len=31)
    _write(tmp_path / "bank2", tree, {"config": {"data": {"train": str(tmp_path / "plain")}}})
    with pytest.raises(BankError, match=r"not prepared with --clusters.*--tree"):
        TreeBank.open(tmp_path / "bank2")
    _check(TreeBank.open(tmp_path / "bank2", tree=root / "tree").fetch(docs[:2]),
           tree, docs[:2])


def test_bank_that_does_not_fit_the_tree_is_refused(setup, tmp_path):
    root, _, _, tree = setup
    _write(tmp_path / "short", tree, {"tree": str(root / "tree")}, sizes={1: 15})
    with pytest.raises(BankError, match=r"table bank1 has 15 rows, level 2 .* has 16 nodes"):
        TreeBank.open(tmp_path / "short")
    write_bank(tmp_path / "values", {"values": TableRows(4, 2, torch.float32,
                                                         [torch.zeros(4, 2)])})
    with pytest.raises(BankError, match="no hierarchical level tables"):
        TreeBank.open(tmp_path / "values", tree=root / "tree")


def test_fetch_from_the_memory_server_equals_disk(setup):
    root, _, docs, tree = setup
    _write(root / "served", tree, {"tree": str(root / "tree")})
    with running_server(root / "served") as url:
        with pytest.raises(BankError, match="--tree"):
            TreeBank.open(url)
        _check(TreeBank.open(url, tree=root / "tree").fetch(docs[:5]), tree, docs[:5])


def test_cli_fetch_prints_path_ids_and_bytes(setup, capsys):
    root, _, docs, tree = setup
    _write(root / "cli-bank", tree, {"tree": str(root / "tree")})
    assert main(["fetch", "--rows", str(root / "cli-bank"), "--text", docs[0], "--text",
                 docs[1]]) == 0
    out = capsys.readouterr().out
    path = tree.route(docs[:1])[0].tolist()
    assert f"path (node ids, root to leaf): {path[0]} -> {path[1]}" in out
    assert f"fetched {4 * sum(DIMS)} bytes in 2 blocks" in out
    assert main(["fetch", "--rows", str(root / "cli-bank"), "--text", docs[2], "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["path"] == tree.route(docs[2:3])[0].tolist()
    assert result["bytes"] == [4 * DIMS[0], 4 * DIMS[1]]
    assert main(["fetch", "--rows", str(root / "nowhere"), "--text", "x"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_fetch_from_an_exported_checkpoint_bank(setup, tmp_path, capsys):
    """train (bank_path from the clustered data) -> export bank -> fetch, with the tree found
    through the export's manifest: the fetched blocks are the checkpoint's rows of the path."""
    from memtron.config import load_config
    from memtron.export.bank import export_bank
    from memtron.storage.checkpoint import CheckpointReader
    from memtron.train.trainer import Trainer
    from tests.conftest import TINY_SEQ_LEN, tiny_overrides

    root, raw, docs, tree = setup
    for split in ("train", "valid"):
        prepare([raw], tmp_path / split, seq_len=TINY_SEQ_LEN, clusters=root / "tree")
    bank = {"bank.layers": "[0]", "bank.levels": 2, "bank.branching": 4,
            "bank.block_sizes": "[2,4]"}
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path / "run", **bank,
                                           **{"train.steps": 2, "data.questions": ""}))
    checkpoint = Trainer(cfg).run().checkpoint
    export_bank(checkpoint, tmp_path / "bank")
    fetched = TreeBank.open(tmp_path / "bank").fetch(docs[:3])
    assert [f.path for f in fetched] == tree.route(docs[:3]).tolist()
    with CheckpointReader(checkpoint) as reader:
        for f in fetched:
            for level, (row, block) in enumerate(zip(f.rows, f.blocks, strict=True)):
                key = f"model.value_tables.{level_table(level)}.weight"
                assert torch.equal(block, reader.read_rows(key, row, row + 1)[0])
    assert main(["fetch", "--rows", str(tmp_path / "bank"), "--text", docs[0]]) == 0
    assert f"{fetched[0].path[0]} -> {fetched[0].path[1]}" in capsys.readouterr().out
