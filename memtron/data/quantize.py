"""Product-quantisation codebooks for explicit-memory stores: k-means per sub-space.

Fitting codebooks is learning from data, so it lives here; encoding and decoding with given
codebooks is the store's codec (:class:`memtron.storage.explicit.PQCodec`).
"""

from __future__ import annotations

import numpy as np
import torch

from memtron.storage.explicit import PQ_CENTROIDS, PQCodec


def kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Centroids [k, d] of points x [n, d] by Lloyd's algorithm. With at most k distinct points
    the centroids are those points (PQ is then exact); spare centroids repeat a point."""
    x = x.astype(np.float32)
    distinct = np.unique(x, axis=0)
    if len(distinct) <= k:
        return distinct[np.arange(k) % len(distinct)]
    centroids = distinct[rng.choice(len(distinct), k, replace=False)].copy()
    x_sq = (x * x).sum(1)[:, None]
    for _ in range(iters):
        dist = x_sq - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
        assign = dist.argmin(1)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        empty = counts == 0
        centroids[~empty] = sums[~empty] / counts[~empty, None]
        if empty.any():  # re-seed empty clusters at the worst-served points
            worst = dist[np.arange(len(x)), assign].argsort()[::-1][: int(empty.sum())]
            centroids[empty] = x[worst]
    return centroids


def train_pq(codec: PQCodec, vectors: torch.Tensor, iters: int = 20, seed: int = 0
             ) -> torch.Tensor:
    """Fit ``codec``'s codebooks on a sample of memories [n, n_vectors, D] (numpy k-means per
    (K|V, layer, KV head, sub-space) group); sets and returns them."""
    grouped = codec.grouped(vectors).numpy()
    rng = np.random.default_rng(seed)
    books = np.zeros((codec.layout.n_groups, codec.n_sub, PQ_CENTROIDS, codec.sub_dim),
                     dtype=np.float32)
    for g in range(codec.layout.n_groups):
        for s in range(codec.n_sub):
            books[g, s] = kmeans(grouped[g, :, s], PQ_CENTROIDS, iters, rng)
    codec.codebooks = torch.from_numpy(books)
    return codec.codebooks
