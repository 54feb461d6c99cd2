"""Cluster tree for hierarchical memory banks: balance, determinism, routing consistency,
storage, and prepared samples carrying their leaf's path."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from memtron.cli import main
from memtron.data.clustering import (
    ClusterTree,
    TreeError,
    balance_biases,
    build_tree,
    corpus_balance,
)
from memtron.data.embed import HashedNgramEmbedder
from memtron.data.loader import ShardLoader
from memtron.data.prepare import prepare
from memtron.data.synthetic import generate_corpus
from memtron.data.tokenizer import ByteTokenizer

LEVELS, BRANCHING, TOLERANCE = 2, 4, 0.1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_corpus(out, seed=3, n_entities=60, n_train_docs=400, n_valid_docs=20,
                    questions_per_bucket=5)
    path = out / "raw" / "train.jsonl"
    return path, [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _build(docs, seed=0, **kwargs) -> ClusterTree:
    return build_tree(docs, LEVELS, BRANCHING, HashedNgramEmbedder(dim=64), seed=seed,
                      tolerance=TOLERANCE, **kwargs)


@pytest.fixture(scope="module")
def tree(corpus):
    return _build(corpus[1])


def test_node_numbering(tree):
    assert tree.nodes_per_level() == [4, 16] and tree.n_nodes == 20
    assert [tree.level_offset(level) for level in (1, 2)] == [0, 4]
    assert [tree.node_level(i) for i in (0, 3, 4, 19)] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="node id 20"):
        tree.node_level(20)


def _sibling_counts(paths: np.ndarray, tree: ClusterTree, level: int) -> np.ndarray:
    local = paths[:, level - 1] - tree.level_offset(level)
    return np.bincount(local, minlength=tree.branching**level).reshape(-1, tree.branching)


def test_tree_is_balanced_within_tolerance(corpus, tree):
    paths = tree.fit_paths
    assert paths.shape == (len(corpus[1]), LEVELS)
    for level in range(1, LEVELS + 1):
        groups = _sibling_counts(paths, tree, level)
        share = groups.sum(1, keepdims=True) / BRANCHING
        assert np.all(np.abs(groups - share) <= TOLERANCE * share + 1), (level, groups)
        assert tree.info["balance"][level - 1]["within_tolerance"]
    # the stated tolerance is not vacuous: plain nearest-centroid routing is far less even
    x = tree.embedder.embed(corpus[1])
    plain = ((x[:, None, :] - tree.centroids[None, :BRANCHING]) ** 2).sum(-1).argmin(1)
    assert np.bincount(plain, minlength=BRANCHING).max() > (1 + TOLERANCE) * len(x) / 4 + 1


def test_routing_a_training_document_returns_its_own_leaf(corpus, tree):
    routed = tree.route(corpus[1])
    assert routed.dtype == np.int64
    assert np.array_equal(routed, tree.fit_paths)
    # a path descends the tree: each node is a child of the one above it
    parent = routed[:, 0] - tree.level_offset(1)
    child = routed[:, 1] - tree.level_offset(2)
    assert np.array_equal(child // BRANCHING, parent)
    streamed = np.concatenate(list(tree.route_stream(iter(corpus[1]), batch_size=37)))
    assert np.array_equal(streamed, routed)


def test_documents_of_one_entity_mostly_share_a_top_level_node(corpus, tree):
    """The hashed embedding groups documents by what they are about (their entity's name)."""
    docs = corpus[1]
    names = [re.search(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b", d).group(0) for d in docs]
    by_entity: dict[str, list[int]] = {}
    for name, node in zip(names, tree.fit_paths[:, 0].tolist(), strict=True):
        by_entity.setdefault(name, []).append(node)
    groups = [nodes for nodes in by_entity.values() if len(nodes) >= 4]
    agreement = np.mean([np.bincount(g).max() / len(g) for g in groups])
    assert agreement > 0.5  # random placement would give about 1/4 + noise


def test_build_is_deterministic_for_a_seed(corpus, tree):
    again = _build(corpus[1])
    assert np.array_equal(again.centroids, tree.centroids)
    assert np.array_equal(again.biases, tree.biases)
    assert np.array_equal(again.fit_paths, tree.fit_paths)
    other = _build(corpus[1], seed=1)
    assert not np.array_equal(other.centroids, tree.centroids)


def test_fit_on_a_sample_then_stream_the_corpus(corpus):
    docs = corpus[1]
    tree = _build(iter(docs), sample_size=200)
    assert tree.info["sample_size"] == 200 and tree.info["documents_seen"] == len(docs)
    balance = corpus_balance(tree, iter(docs), batch_size=64)
    assert sum(b["mean"] * b["nodes"] for b in balance[:1]) == len(docs)
    assert [b["nodes"] for b in balance] == [4, 16]
    with pytest.raises(ValueError, match="cannot fill"):
        _build(docs[:3])


def test_balance_biases_even_for_skewed_points():
    rng = np.random.default_rng(0)
    centers = np.eye(5, 8, dtype=np.float32) * 4
    x = np.concatenate([rng.normal(size=(900, 8)) + centers[0], rng.normal(size=(100, 8))])
    dist = ((x[:, None, :] - centers[None]) ** 2).sum(-1).astype(np.float32)
    assert np.bincount(dist.argmin(1), minlength=5).max() > 600  # skewed without biases
    sizes = np.bincount((dist + balance_biases(dist, 0.05)).argmin(1), minlength=5)
    assert np.all(np.abs(sizes - 200) <= 0.05 * 200 + 1), sizes


def test_save_load_round_trip_and_corruption_named(corpus, tree, tmp_path):
    tree.save(tmp_path / "tree")
    loaded = ClusterTree.load(tmp_path / "tree")
    assert (loaded.levels, loaded.branching, loaded.n_nodes) == (LEVELS, BRANCHING, 20)
    assert np.array_equal(loaded.route(corpus[1]), tree.fit_paths)
    assert loaded.info["balance"] == tree.info["balance"]
    with pytest.raises(ValueError, match=r"embeddings of shape \(2, 3\)"):
        loaded.route_embeddings(np.zeros((2, 3)))

    centroids = tmp_path / "tree" / "centroids.npy"
    data = bytearray(centroids.read_bytes())
    data[-1] ^= 1
    centroids.write_bytes(bytes(data))
    with pytest.raises(TreeError, match=r"centroids\.npy: sha256 mismatch"):
        ClusterTree.load(tmp_path / "tree")
    tree.save(tmp_path / "tree")  # replaces the damaged directory whole
    (tmp_path / "tree" / "embedder.npy").unlink()
    with pytest.raises(TreeError, match=r"embedder\.npy: listed in .*tree\.json but missing"):
        ClusterTree.load(tmp_path / "tree")
    with pytest.raises(TreeError, match=r"nowhere[/\\]tree\.json: no such file"):
        ClusterTree.load(tmp_path / "nowhere")


def test_prepared_samples_carry_their_leaf_path(corpus, tree, tmp_path):
    path, docs = corpus
    tree.save(tmp_path / "tree")
    seq = 63
    index = prepare([path], tmp_path / "data", seq_len=seq, samples_per_shard=50,
                    clusters=tmp_path / "tree")
    assert index["fields"] == {"bank_path": {"shape": [LEVELS], "dtype": "int64"}}
    assert ClusterTree.load(tmp_path / "data" / "tree").n_nodes == tree.n_nodes
    # expected: per leaf, its documents in input order, each + eos, cut into samples
    tok = ByteTokenizer()
    streams: dict[tuple[int, ...], list[int]] = {}
    for doc, route in zip(docs, tree.fit_paths.tolist(), strict=True):
        streams.setdefault(tuple(route), []).extend([*tok.encode(doc), tok.eos_id])
    loader = ShardLoader(tmp_path / "data", 1, seq, shuffle=False)
    got: dict[tuple[int, ...], list[int]] = {}
    for batch in [next(it) for it in [iter(loader)] for _ in range(index["n_samples"])]:
        got.setdefault(tuple(batch.fields["bank_path"][0].tolist()), []).extend(
            batch.tokens[0].tolist())
    assert set(got) <= set(streams)
    for route, tokens in got.items():
        assert tokens == streams[route][:len(tokens)]  # only this leaf's documents, in order
        assert len(streams[route]) - len(tokens) < seq + 1  # only a partial sample dropped
    dropped = sum(len(s) - len(got.get(r, [])) for r, s in streams.items())
    assert dropped == index["dropped_tokens"]
    assert index["clusters"]["leaves_with_samples"] == len(got)
    batch = next(iter(ShardLoader(tmp_path / "data", 4, seq, seed=1)))
    assert batch.fields["bank_path"].shape == (4, LEVELS)
    assert batch.fields["bank_path"].dtype == torch.int64


def test_cli_cluster_prints_balance_and_prepare_uses_it(corpus, tmp_path, capsys):
    path, docs = corpus
    assert main(["data", "cluster", str(path), "--out", str(tmp_path / "tree"), "--levels", "2",
                 "--branching", "4", "--dim", "64", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert f"fitted on {len(docs)} of {len(docs)} documents" in out
    assert "within 10%" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[1] for r in rows] == ["4", "16"] * 2  # the sample, then the whole corpus
    assert all(r[-1] == "yes" for r in rows)  # the sample is the corpus here
    manifest = json.loads((tmp_path / "tree" / "tree.json").read_text())
    assert len(manifest["info"]["corpus_balance"]) == 2
    assert main(["data", "prepare", str(path), "--out", str(tmp_path / "data"), "--seq-len",
                 "63", "--clusters", str(tmp_path / "tree")]) == 0
    assert "bank_path" in json.loads((tmp_path / "data" / "index.json").read_text())["fields"]
    assert main(["data", "prepare", str(path), "--out", str(tmp_path / "bad"),
                 "--clusters", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
