"""Document and chunk embeddings for memory addressing: hierarchical-bank clustering and
explicit-memory retrieval embed text the same way, so one module serves both.

The default, ``HashedNgramEmbedder``, needs no download and no training beyond document
frequencies: character n-grams are hashed into a large bucket space, weighted by sublinear TF
times IDF, and projected to ``dim`` signed coordinates (feature hashing). A local
sentence-embedding model directory is the option (``SentenceModelEmbedder``).

An embedder is rebuilt from its saved state (``save_embedder`` / ``load_embedder``): a tree or a
retrieval index stores the embedder it was built with, so a prompt at inference is embedded by
exactly the function that placed the training documents.

Every embedder's ``embed(texts)`` returns ``[len(texts), dim]`` float32 rows, L2-normalised
(an empty text gives a zero row).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

# splitmix64-style mixing constants: spread a polynomial rolling hash over all 64 bits.
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_BASE = np.uint64(0x100000001B3)


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return h ^ (h >> np.uint64(31))


def ngram_hashes(text: str, ngram_range: tuple[int, int]) -> np.ndarray:
    """64-bit hashes of every character n-gram of the lower-cased UTF-8 bytes of ``text``,
    for n in ``ngram_range`` (inclusive), vectorised: no Python loop over n-grams."""
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    out = []
    with np.errstate(over="ignore"):  # the rolling hash wraps modulo 2**64 by design
        for n in range(ngram_range[0], ngram_range[1] + 1):
            if len(data) < n:
                break
            h = np.full(len(data) - n + 1, np.uint64(n), dtype=np.uint64)
            for j in range(n):
                h = h * _BASE + data[j:len(data) - n + 1 + j]
            out.append(_mix(h))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)


class HashedNgramEmbedder:
    """Hashed character n-gram TF-IDF, projected to ``dim`` signed coordinates.

    ``fit`` only counts document frequencies (streaming, bounded memory: one float per bucket);
    an unfitted embedder uses IDF = 1 everywhere.
    """

    kind = "hashed-ngram"

    def __init__(self, dim: int = 256, n_buckets: int = 1 << 20,
                 ngram_range: tuple[int, int] = (3, 5), seed: int = 0) -> None:
        if dim < 1 or n_buckets < dim:
            raise ValueError(f"need 1 <= dim <= n_buckets, got dim={dim}, n_buckets={n_buckets}")
        if not 1 <= ngram_range[0] <= ngram_range[1]:
            raise ValueError(f"bad ngram_range {ngram_range}")
        self.dim, self.n_buckets, self.seed = dim, n_buckets, seed
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.idf = np.ones(n_buckets, dtype=np.float32)
        self.n_docs = 0
        # Each bucket maps to one output coordinate with a sign: a sparse random projection
        # that keeps inner products in expectation.
        rng = np.random.default_rng(seed)
        self._coord = rng.integers(0, dim, n_buckets, dtype=np.int64)
        self._sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), n_buckets)

    def _buckets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        buckets = ngram_hashes(text, self.ngram_range) % np.uint64(self.n_buckets)
        return np.unique(buckets.astype(np.int64), return_counts=True)

    def fit(self, texts: Iterable[str]) -> HashedNgramEmbedder:
        df = np.zeros(self.n_buckets, dtype=np.int64)
        n = 0
        for text in texts:
            ids, _ = self._buckets(text)
            df[ids] += 1
            n += 1
        self.n_docs = n
        self.idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        return self

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            ids, counts = self._buckets(text)
            if len(ids) == 0:
                continue
            w = (1.0 + np.log(counts)).astype(np.float32) * self.idf[ids] * self._sign[ids]
            out[row] = np.bincount(self._coord[ids], weights=w, minlength=self.dim)
        return normalize_rows(out)

    def state(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "n_buckets": self.n_buckets,
                "ngram_range": list(self.ngram_range), "seed": self.seed, "n_docs": self.n_docs}


class SentenceModelEmbedder:
    """Mean-pooled last hidden states of a local Hugging Face encoder directory (no download:
    ``local_files_only``). Slower than the hashed default, but semantic."""

    kind = "sentence-model"

    def __init__(self, path: str | Path, batch_size: int = 32, max_length: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path, self.batch_size, self.max_length = str(path), batch_size, max_length
        if not Path(self.path).is_dir():
            raise FileNotFoundError(f"sentence-embedding model directory not found: {self.path}")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).eval()
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True,
                                     truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float().numpy())
        emb = np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)
        return normalize_rows(emb.astype(np.float32))

    def state(self) -> dict:
        return {"kind": self.kind, "path": self.path, "batch_size": self.batch_size,
                "max_length": self.max_length}


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


AnyEmbedder = HashedNgramEmbedder | SentenceModelEmbedder


def make_embedder(spec: str = "hashed", dim: int = 256) -> AnyEmbedder:
    """``hashed`` (the default) or the path of a local sentence-embedding model directory."""
    if spec in ("hashed", "hashed-ngram"):
        return HashedNgramEmbedder(dim=dim)
    return SentenceModelEmbedder(spec)


def save_embedder(embedder: AnyEmbedder, path: str | Path) -> None:
    """``path``.json holds the parameters; a hashed embedder adds its IDF as ``path``.npy."""
    path = Path(path)
    path.with_suffix(".json").write_text(json.dumps(embedder.state(), indent=1))
    if isinstance(embedder, HashedNgramEmbedder):
        np.save(path.with_suffix(".npy"), embedder.idf)


def load_embedder(path: str | Path) -> AnyEmbedder:
    path = Path(path)
    meta_file = path.with_suffix(".json")
    try:
        state = json.loads(meta_file.read_text())
        kind = state["kind"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{meta_file}: not a memtron embedder description ({e})") from e
    if kind == SentenceModelEmbedder.kind:
        return SentenceModelEmbedder(state["path"], state["batch_size"], state["max_length"])
    if kind != HashedNgramEmbedder.kind:
        raise ValueError(f"{meta_file}: unknown embedder kind {kind!r}")
    emb = HashedNgramEmbedder(state["dim"], state["n_buckets"], tuple(state["ngram_range"]),
                              state["seed"])
    idf_file = path.with_suffix(".npy")
    try:
        idf = np.load(idf_file)
    except (OSError, ValueError) as e:
        raise ValueError(f"{idf_file}: cannot read the embedder's IDF ({e})") from e
    if idf.shape != (emb.n_buckets,):
        raise ValueError(f"{idf_file}: IDF has shape {idf.shape}, expected ({emb.n_buckets},)")
    emb.idf, emb.n_docs = idf.astype(np.float32), state["n_docs"]
    return emb
