"""Balanced hierarchical k-means over document embeddings: the tree that addresses the blocks
of a hierarchical memory bank (DESIGN §5).

Tree and node ids. ``levels`` levels below an implicit root, each node with ``branching``
children. Level ``l`` (1-based) has ``branching**l`` nodes; node ids are level-major without the
root: ``id = sum_{1<=j<l} branching**j + index``, where a child's index within its level is
``parent_index * branching + c``. A document's path is its ``levels`` node ids, root to leaf.

Routing. A document descends from the root: among the children of its current node it takes
the one minimising ``||x - centroid||^2 + bias``. The per-node ``bias`` is what makes the tree
balanced *and* consistent: build-time assignment and inference-time routing are the same rule,
so a training document routed again lands in the leaf it was placed in (no separate
"capacity-constrained" assignment that routing could not reproduce).

Fitting (per node, on the documents of a reservoir sample that reach it): k-means++ seeding,
mini-batch k-means (Sculley 2010), then balanced Lloyd passes. Balancing solves for the biases
by coordinate steps of the dual of the balanced assignment (semi-discrete transport): each step
sets one child's bias so that exactly its share ``n / branching`` of the node's documents would
choose it, and rounds repeat until every child holds its share within ``tolerance`` (relative,
plus one document for rounding). Identical embeddings cannot be split, which is the only thing
that can leave a node outside the tolerance; the achieved figures are recorded in the manifest.
Everything is seeded per node from ``(seed, level, index)``: the same seed gives the same tree.

Scale: the fit holds only the sample (``sample_size`` embeddings); assigning millions of
documents is :meth:`ClusterTree.route_stream` (embed + descend in batches, bounded memory).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from memtron.data.embed import (
    AnyEmbedder,
    HashedNgramEmbedder,
    load_embedder,
    normalize_rows,
    save_embedder,
)
from memtron.data.shards import DataError, building_dir, read_json_manifest
from memtron.storage.manifest import sha256_file

TREE_MANIFEST = "tree.json"
TREE_FORMAT = "memtron-cluster-tree"
TREE_VERSION = 1
CENTROIDS = "centroids.npy"  # [n_nodes, dim] float32, row = node id
BIASES = "biases.npy"  # [n_nodes] float32, row = node id
EMBEDDER = "embedder"  # embedder.json (+ embedder.npy): see memtron.data.embed.save_embedder
ROUTE_CHUNK = 1024  # rows per routing step: a [chunk, branching, dim] float32 temporary
DEFAULT_TOLERANCE = 0.1


class TreeError(DataError, ValueError):
    """A cluster-tree directory is missing, corrupt or inconsistent; the message names the
    file."""


def _sqdist(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``[n, b]`` squared distances of rows ``x [n, d]`` to ``centroids`` ``[n or 1, b, d]``.

    Computed elementwise (not as a matmul), so a row's distances do not depend on which other
    rows share the call: the fit and routing get bit-identical numbers. Rows go
    :data:`ROUTE_CHUNK` at a time to bound the ``[rows, b, d]`` temporary."""
    out = np.empty((len(x), centroids.shape[1]), dtype=np.float32)
    for i in range(0, len(x), ROUTE_CHUNK):
        c = centroids if len(centroids) == 1 else centroids[i:i + ROUTE_CHUNK]
        out[i:i + ROUTE_CHUNK] = np.square(x[i:i + ROUTE_CHUNK, None, :] - c).sum(-1)
    return out


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds among the rows of ``x`` (at most 64 * k of them are considered)."""
    if len(x) > 64 * k:
        x = x[rng.choice(len(x), 64 * k, replace=False)]
    centers = [x[rng.integers(len(x))]]
    closest = np.square(x - centers[0]).sum(1, dtype=np.float64)  # float64: p must sum to 1
    for _ in range(1, k):
        total = closest.sum()
        i = rng.choice(len(x), p=closest / total) if total > 0 else rng.integers(len(x))
        centers.append(x[i])
        closest = np.minimum(closest, np.square(x - x[i]).sum(1, dtype=np.float64))
    return np.stack(centers).astype(np.float32)


def _minibatch_kmeans(x: np.ndarray, k: int, rng: np.random.Generator, steps: int,
                      batch_size: int) -> np.ndarray:
    """Sculley's mini-batch k-means: per-centre learning rate 1 / (points seen)."""
    centers = _kmeanspp(x, k, rng)
    seen = np.zeros(k, dtype=np.float64)
    for _ in range(steps):
        batch = x[rng.choice(len(x), min(batch_size, len(x)), replace=False)]
        nearest = _sqdist(batch, centers[None]).argmin(1)
        for c in np.unique(nearest):
            members = batch[nearest == c]
            seen[c] += len(members)
            centers[c] += (members.sum(0) - len(members) * centers[c]) / seen[c]
    return centers


def _sizes(cost: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.bincount((cost + bias).argmin(1), minlength=cost.shape[1])


def _within(sizes: np.ndarray, n: int, tolerance: float) -> bool:
    share = n / len(sizes)
    return bool(np.all(np.abs(sizes - share) <= tolerance * share + 1))


def balance_biases(dist: np.ndarray, tolerance: float = DEFAULT_TOLERANCE,
                   rounds: int = 50) -> np.ndarray:
    """Biases ``[b]`` such that ``argmin(dist + bias)`` over the ``b`` columns gives every
    column ``n / b`` rows within ``tolerance`` (when identical rows allow it).

    Coordinate steps on the dual of the balanced assignment: a row joins column k iff
    ``bias_k < min_{j != k}(dist_j + bias_j) - dist_k``; setting bias_k between the m-th and
    (m+1)-th largest of those thresholds gives column k exactly m rows, for the others' biases.
    """
    n, b = dist.shape
    bias = np.zeros(b, dtype=np.float32)
    if n == 0 or b == 1:
        return bias
    d64 = dist.astype(np.float64)
    shares = np.full(b, n // b) + (np.arange(b) < n % b)  # sum to n exactly
    for _ in range(rounds):
        if _within(_sizes(dist, bias), n, tolerance):
            break
        for k in range(b):
            cost = d64 + bias
            cost[:, k] = np.inf
            threshold = np.sort(cost.min(1) - d64[:, k])[::-1]  # descending
            m = int(shares[k])
            if m == 0:
                bias[k] = threshold[0] + 1.0
            elif m >= n:
                bias[k] = threshold[-1] - 1.0
            else:
                bias[k] = (threshold[m - 1] + threshold[m]) / 2
    return bias


def _fit_node(x: np.ndarray, b: int, rng: np.random.Generator, tolerance: float,
              fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``[b, d]`` and biases ``[b]`` of one node's children from its documents."""
    n = len(x)
    if n == 0:  # an unvisited node: children copy the parent, the first one wins routing
        return np.repeat(fallback[None], b, 0).astype(np.float32), np.zeros(b, np.float32)
    if n <= b:  # one document per child; the rest copy them and never win (lower index wins)
        return x[np.arange(b) % n].astype(np.float32), np.zeros(b, np.float32)
    centers = _minibatch_kmeans(x, b, rng, steps=20, batch_size=max(256, 8 * b))
    bias = np.zeros(b, np.float32)
    for _ in range(3):  # balanced Lloyd passes: balanced assignment, then cluster means
        dist = _sqdist(x, centers[None])
        bias = balance_biases(dist, tolerance)
        assign = (dist + bias).argmin(1)
        for c in range(b):
            members = x[assign == c]
            if len(members):
                centers[c] = members.mean(0)
    return centers, balance_biases(_sqdist(x, centers[None]), tolerance)


class TreeShape:
    """The node numbering of a tree of ``levels`` x ``branching``: level-major without the root,
    a child of node index i within its level being ``i * branching + c``. Bank tables are
    addressed by it, whether or not a fitted tree is at hand."""

    def __init__(self, levels: int, branching: int) -> None:
        if levels < 1 or branching < 2:
            raise ValueError(f"need levels >= 1 and branching >= 2, got {levels}, {branching}")
        self.levels, self.branching = int(levels), int(branching)

    @property
    def n_nodes(self) -> int:
        return sum(self.nodes_per_level())

    def nodes_per_level(self) -> list[int]:
        return [self.branching**level for level in range(1, self.levels + 1)]

    def level_offset(self, level: int) -> int:
        """Node id of the first node of ``level`` (1-based)."""
        return sum(self.branching**j for j in range(1, level))

    def node_level(self, node_id: int) -> int:
        """The level (1-based) of a node id."""
        if not 0 <= node_id < self.n_nodes:
            raise ValueError(f"node id {node_id} is not in [0, {self.n_nodes})")
        return next(level for level in range(self.levels, 0, -1)
                    if node_id >= self.level_offset(level))


class ClusterTree(TreeShape):
    """A balanced k-means tree over document embeddings; see the module docstring."""

    def __init__(self, levels: int, branching: int, centroids: np.ndarray, biases: np.ndarray,
                 embedder: AnyEmbedder, info: dict | None = None,
                 fit_paths: np.ndarray | None = None) -> None:
        super().__init__(levels, branching)
        n_nodes = self.n_nodes
        if centroids.shape != (n_nodes, embedder.dim) or biases.shape != (n_nodes,):
            raise ValueError(f"centroids {centroids.shape} / biases {biases.shape} do not fit "
                             f"{n_nodes} nodes of dim {embedder.dim}")
        self.centroids = centroids.astype(np.float32, copy=False)
        self.biases = biases.astype(np.float32, copy=False)
        self.embedder = embedder
        self.info = dict(info or {})  # build figures: seed, sample size, balance per level
        self.fit_paths = fit_paths  # paths of the fitting sample's documents, in sample order

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def _step(self, x: np.ndarray, parent: np.ndarray, level: int) -> np.ndarray:
        """Indices within ``level`` of the children chosen by rows ``x`` under ``parent``."""
        children = parent[:, None] * self.branching + np.arange(self.branching)
        rows = self.level_offset(level) + children
        cost = _sqdist(x, self.centroids[rows]) + self.biases[rows]
        return children[np.arange(len(x)), cost.argmin(1)]

    def route_embeddings(self, x: np.ndarray) -> np.ndarray:
        """``[n, levels]`` int64 node ids of the root-to-leaf paths of embeddings ``x``."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings of shape {x.shape}, the tree needs [n, {self.dim}]")
        out = np.empty((len(x), self.levels), dtype=np.int64)
        for start in range(0, len(x), ROUTE_CHUNK):
            chunk = x[start:start + ROUTE_CHUNK]
            index = np.zeros(len(chunk), dtype=np.int64)
            for level in range(1, self.levels + 1):
                index = self._step(chunk, index, level)
                out[start:start + len(chunk), level - 1] = self.level_offset(level) + index
        return out

    def route(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, levels]`` int64 node ids: embed each text with the tree's embedder, descend."""
        return self.route_embeddings(self.embedder.embed(list(texts)))

    def expect_shape(self, levels: int, branching: int) -> ClusterTree:
        """This tree, if it is ``levels`` x ``branching`` (the model's ``bank.levels`` and
        ``bank.branching``): a tree of another shape addresses other blocks."""
        if (self.levels, self.branching) != (levels, branching):
            raise TreeError(f"the tree is {self.levels} x {self.branching}, the model's tree "
                            f"memory (bank.levels x bank.branching) is {levels} x {branching}")
        return self

    def route_stream(self, texts: Iterable[str], batch_size: int = 1024) -> Iterator[np.ndarray]:
        """Paths of any number of texts, ``batch_size`` at a time (bounded memory)."""
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                yield self.route(batch)
                batch = []
        if batch:
            yield self.route(batch)

    def save(self, directory: str | Path) -> None:
        """Centroids, biases, embedder and a manifest with a sha256 per file, written to a
        temporary sibling and swapped in whole."""
        with building_dir(directory) as tmp:
            np.save(tmp / CENTROIDS, self.centroids)
            np.save(tmp / BIASES, self.biases)
            save_embedder(self.embedder, tmp / EMBEDDER)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            manifest = {"format": TREE_FORMAT, "version": TREE_VERSION, "levels": self.levels,
                        "branching": self.branching, "n_nodes": self.n_nodes, "dim": self.dim,
                        "info": self.info, "files": files}
            (tmp / TREE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ClusterTree:
        """Read a tree written by :meth:`save`, verifying every file's checksum."""
        directory = Path(directory)
        manifest_path = directory / TREE_MANIFEST
        manifest = read_json_manifest(manifest_path, TREE_FORMAT, (TREE_VERSION,), TreeError,
                                      "build the tree with `memtron data cluster`")
        try:
            files = dict(manifest["files"])
            levels, branching = int(manifest["levels"]), int(manifest["branching"])
        except (KeyError, TypeError, ValueError) as e:
            raise TreeError(f"{manifest_path}: malformed manifest: {e!r}") from e
        for name in (CENTROIDS, BIASES, EMBEDDER + ".json"):
            if name not in files:
                raise TreeError(f"{manifest_path}: lists no {name}")
        for name, digest in files.items():
            path = directory / name
            if not path.is_file():
                raise TreeError(f"{path}: listed in {manifest_path} but missing")
            if sha256_file(path) != digest:
                raise TreeError(f"{path}: sha256 mismatch with {manifest_path} (corrupt file)")
        try:
            centroids = np.load(directory / CENTROIDS, allow_pickle=False)
            biases = np.load(directory / BIASES, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TreeError(f"{directory}: unreadable centroids or biases: {e}") from e
        try:
            embedder = load_embedder(directory / EMBEDDER)
            return cls(levels, branching, centroids, biases, embedder, manifest.get("info"))
        except (OSError, ValueError) as e:
            raise TreeError(f"{directory}: {e}") from e


def route_texts(tree: ClusterTree | None, texts: list[str]) -> torch.Tensor | None:
    """[n, levels] node ids of each text's path down ``tree``: the tree path a prompt (or a
    fact question) is answered with. None without a tree (no tree memory, or a generic-only
    one)."""
    if tree is None:
        return None
    return torch.from_numpy(tree.route(texts)).long()


def reservoir_sample(texts: Iterable[str], size: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of at most ``size`` texts in one pass (Algorithm R) and the number
    seen; when there are at most ``size`` texts it is all of them, in input order."""
    rng = np.random.default_rng([seed, 1])
    sample: list[str] = []
    n = 0
    for n, text in enumerate(texts, 1):
        if n <= size:
            sample.append(text)
        else:
            j = int(rng.integers(n))
            if j < size:
                sample[j] = text
    return sample, n


def _embed_all(embedder: AnyEmbedder, texts: Sequence[str], batch_size: int = 4096
               ) -> np.ndarray:
    parts = [embedder.embed(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts).astype(np.float32)


def build_tree(texts: Iterable[str], levels: int = 4, branching: int = 16,
               embedder: AnyEmbedder | None = None, seed: int = 0,
               sample_size: int = 200_000, tolerance: float = DEFAULT_TOLERANCE) -> ClusterTree:
    """Fit a balanced tree on a uniform sample of ``texts`` (one pass over them).

    An unfitted hashed embedder (the default) first learns its IDF on the sample. The returned
    tree's ``fit_paths`` are the sample's paths as assigned while fitting; ``info`` holds the
    balance achieved per level on the sample.
    """
    if levels < 1 or branching < 2:
        raise ValueError(f"need levels >= 1 and branching >= 2, got {levels}, {branching}")
    if sample_size < 1 or not tolerance >= 0:
        raise ValueError(f"bad sample_size {sample_size} or tolerance {tolerance}")
    embedder = embedder if embedder is not None else HashedNgramEmbedder()
    sample, n_seen = reservoir_sample(texts, sample_size, seed)
    if len(sample) < branching:
        raise ValueError(f"{len(sample)} documents cannot fill the {branching} top-level "
                         "clusters of the tree")
    if isinstance(embedder, HashedNgramEmbedder) and embedder.n_docs == 0:
        embedder.fit(sample)
    x = _embed_all(embedder, sample)
    n_nodes = sum(branching**level for level in range(1, levels + 1))
    centroids = np.zeros((n_nodes, x.shape[1]), dtype=np.float32)
    biases = np.zeros(n_nodes, dtype=np.float32)
    tree = ClusterTree(levels, branching, centroids, biases, embedder)
    index = np.zeros(len(x), dtype=np.int64)  # each document's node within the current level
    parent_centroids = normalize_rows(x.mean(0, keepdims=True))  # the root's
    paths = np.empty((len(x), levels), dtype=np.int64)
    balance = []
    for level in range(1, levels + 1):
        offset = tree.level_offset(level)
        order = np.argsort(index, kind="stable")
        bounds = np.searchsorted(index[order], np.arange(branching ** (level - 1) + 1))
        for parent in range(branching ** (level - 1)):
            members = order[bounds[parent]:bounds[parent + 1]]
            rng = np.random.default_rng([seed, level, parent])
            c, b = _fit_node(x[members], branching, rng, tolerance, parent_centroids[parent])
            rows = slice(offset + parent * branching, offset + (parent + 1) * branching)
            centroids[rows], biases[rows] = c, b
        index = np.concatenate([tree._step(x[i:i + ROUTE_CHUNK], index[i:i + ROUTE_CHUNK],
                                           level) for i in range(0, len(x), ROUTE_CHUNK)])
        paths[:, level - 1] = offset + index
        parent_centroids = centroids[offset:offset + branching**level]
        balance.append(level_balance(np.bincount(index, minlength=branching**level), branching,
                                     tolerance))
    tree.info = {"seed": seed, "sample_size": len(sample), "documents_seen": n_seen,
                 "tolerance": tolerance, "embedder": embedder.state(), "balance": balance}
    tree.fit_paths = paths
    return tree


def corpus_balance(tree: ClusterTree, texts: Iterable[str], batch_size: int = 1024
                   ) -> list[dict]:
    """Route every text (streaming, bounded memory) and return :func:`level_balance` per level
    over all of them: the balance of the whole corpus, not only of the fitting sample."""
    counts = [np.zeros(n, dtype=np.int64) for n in tree.nodes_per_level()]
    for paths in tree.route_stream(texts, batch_size):
        for level, level_counts in enumerate(counts, 1):
            local = paths[:, level - 1] - tree.level_offset(level)
            level_counts += np.bincount(local, minlength=len(level_counts))
    tolerance = float(tree.info.get("tolerance", DEFAULT_TOLERANCE))
    return [level_balance(c, tree.branching, tolerance) for c in counts]


def level_balance(counts: np.ndarray, branching: int,
                  tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Balance figures of one level's per-node document counts: the spread over the level, the
    worst relative deviation of a node from its share of its parent's documents, and whether
    every sibling group is within ``tolerance`` (relative, plus one document)."""
    siblings = counts.reshape(-1, branching)
    totals = siblings.sum(1)
    share = totals[:, None] / branching
    visited = totals > 0
    deviation = np.abs(siblings[visited] - share[visited]) / share[visited]
    return {"nodes": int(len(counts)), "min": int(counts.min()), "max": int(counts.max()),
            "mean": float(counts.mean()),
            "max_sibling_deviation": float(deviation.max()) if deviation.size else 0.0,
            "within_tolerance": all(_within(group, int(total), tolerance)
                                    for group, total in zip(siblings, totals, strict=True))}
