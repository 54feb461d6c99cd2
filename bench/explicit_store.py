"""Explicit-memory store size per reference: bf16 / int8 / pq against the raw text and against
the dense, unsparsified KV of the same chunks, plus the int8 / pq reconstruction error.

The references are the documents of the synthetic facts corpus (memtron data synth), chunked at
``--ref-len`` tokens and encoded by a model of ``--config`` (random weights unless ``--ckpt``:
sizes depend only on the architecture; the errors are those of the given weights). Per
reference:

* memories: the store's ``memories`` rows (what attention reads) in each dtype;
* overhead: positions + spans rows, the retriever's embedding, codebooks (pq) amortised;
* raw text: UTF-8 bytes of the chunk;
* dense KV: ``tokens x n_mem_layers x 2 x kv_heads x head_dim x 2`` bytes (bf16), at the
  chunk's real length and at the nominal ``ref_len``.

    python bench/explicit_store.py --quick      # a few hundred references, < 1 min
    python bench/explicit_store.py --out bench/results/explicit_store.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from memtron.bench.harness import BYTE_LEVEL
from memtron.config import load_config
from memtron.data.synthetic import generate_corpus
from memtron.data.tokenizer import load_tokenizer
from memtron.export.explicit import (
    build_explicit_store,
    dense_kv_bytes,
    read_references,
    size_per_reference,
    store_bytes,
)
from memtron.infer.model import load_model
from memtron.model.memory.explicit import encode_references
from memtron.model.transformer import build_model
from memtron.storage.explicit import ExplicitStore
from memtron.train.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _checkpoint(config: str, overrides: list[str], root: Path) -> Path:
    cfg = load_config(config, [*BYTE_LEVEL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg)
    return save_checkpoint(root / "run" / "checkpoints", 0, {"model": model.state_dict()},
                           {"config": cfg.to_dict(), "data_state": None}, keep_last=1)


def _references(root: Path, entities: int, limit: int) -> Path:
    generate_corpus(root / "corpus", n_entities=entities, seed=0)
    source = root / "corpus" / "raw" / "train.jsonl"
    out = root / "references.jsonl"
    with open(source) as f, open(out, "w") as g:
        for i, line in enumerate(f):
            if i >= limit:
                break
            g.write(line)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.d_model=512 model.n_heads=8")
    p.add_argument("--ckpt", help="trained checkpoint (default: random weights of --config)")
    p.add_argument("--ref-len", type=int, default=128)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--documents", type=int, default=2000)
    p.add_argument("--pq-sub-dim", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="300 documents")
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    documents = 300 if args.quick else args.documents
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else _checkpoint(args.config, args.overrides, root)
        refs = _references(root, entities=max(200, documents // 4), limit=documents)
        results: dict[str, dict] = {}
        for dtype in ("bf16", "int8", "pq"):
            manifest = build_explicit_store(ckpt, refs, root / dtype, m=args.m,
                                            ref_len=args.ref_len, dtype=dtype,
                                            pq_sub_dim=args.pq_sub_dim, progress=False)
            sizes = store_bytes(manifest)
            files = list((root / dtype / "retriever").iterdir())
            embeddings = sum(f.stat().st_size for f in files if f.name == "embeddings.npy")
            results[dtype] = {"manifest": manifest, "tables": sizes, "embeddings": embeddings,
                              "retriever_fixed": sum(f.stat().st_size for f in files)
                              - embeddings}
        meta = manifest["source"]["explicit"]
        n = meta["n_memories"]
        loaded = load_model(ckpt)
        tok = load_tokenizer(loaded.config.data.tokenizer)
        chunks, _ = read_references(refs, tok, args.ref_len)
        raw = sum(len(c.text.encode()) for c in chunks) / n
        tokens = sum(len(c.tokens) for c in chunks) / n
        dense_real, dense_nominal = dense_kv_bytes(meta, tokens), dense_kv_bytes(meta, args.ref_len)

        k, v, _ = encode_references(loaded.model, [[c.tokens for c in chunks[i:i + 32]]
                                                   for i in range(0, n, 32)],
                                    meta["layers"], args.m)
        exact = torch.cat([k, v]).float()
        for dtype, r in results.items():
            fk, fv = ExplicitStore.open(root / dtype).fetch(torch.arange(n))
            r["relative_l2_error"] = float((torch.cat([fk, fv]) - exact).norm() / exact.norm())

    print(f"{n:,} references from {documents:,} documents, {tokens:.1f} tokens and "
          f"{raw:.0f} text bytes each on average; model {meta['model']['n_layers']} layers, "
          f"memory layers {meta['layers']}, {meta['n_kv_heads']} kv heads x {meta['head_dim']}"
          f" dims, top-{args.m} of <= {args.ref_len} tokens")
    print(f"dense bf16 KV per reference: {dense_real:,.0f} B at its real length, "
          f"{dense_nominal:,.0f} B at ref_len={args.ref_len}")
    header = (f"{'dtype':6} {'memories B':>11} {'+per-ref B':>11} {'fixed KiB':>10} {'vs text':>8} "
              f"{'vs dense':>9} {'vs dense@ref_len':>17} {'rel. L2 err':>12}")
    print(header)
    rows = {}
    for dtype, r in results.items():
        size = size_per_reference(r["manifest"], raw, tokens)
        memories = size["memory_bytes"]
        # per reference: positions, spans and its retrieval embedding; fixed: the embedder's
        # IDF table, pq codebooks and the store description
        overhead = (r["tables"]["positions"] + r["tables"]["spans"] + r["embeddings"]) / n
        fixed = (sum(b for t, b in r["tables"].items()
                     if t not in ("memories", "positions", "spans")) + r["retriever_fixed"])
        rows[dtype] = {**size, "per_reference_overhead_bytes": overhead, "fixed_bytes": fixed,
                       "dense_ref_len_over_memory": dense_nominal / memories,
                       "relative_l2_error": r["relative_l2_error"]}
        print(f"{dtype:6} {memories:11,.0f} {overhead:11,.0f} {fixed / 1024:10,.0f} "
              f"{memories / raw:7.1f}x "
              f"{dense_real / memories:8.1f}x {dense_nominal / memories:16.1f}x "
              f"{r['relative_l2_error']:12.4f}")
    print("('vs text' = memory bytes / text bytes; 'vs dense' = dense KV bytes / memory bytes; "
          "per-ref = positions, spans and the retrieval embedding; fixed = embedder IDF table, "
          "pq codebooks, store description)")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"n_references": n, "tokens_per_reference": tokens, "text_bytes": raw,
             "dense_bytes": dense_real, "dense_bytes_ref_len": dense_nominal,
             "meta": {k: meta[k] for k in ("layers", "n_kv_heads", "head_dim", "m",
                                           "ref_len")},
             "dtypes": rows}, indent=1))


if __name__ == "__main__":
    main()
