"""Fact accuracy with and without explicit memories, with 95 % Wilson intervals, and the
store's size per reference against the raw text and against dense (unsparsified) KV.

The two-stage recipe of DESIGN §6, through the shipped entry points, on the synthetic facts
corpus (facts about invented people; only memorisation or a memory can answer):
  1. corpus -> token shards; a copy of the train shards gets ``memory_ids`` later;
  2. arm "plain": train ``stage1 + stage2`` steps without memory, checkpointing at ``stage1``;
  3. store: ``memory build-explicit`` from plain's step-``stage1`` checkpoint over the training
     documents (the reference corpus: every stated fact is in it); ``data retrieve`` on the
     shard copy;
  4. arm "explicit": the same run (same seed, same batches) with ``memory.explicit.start_step
     = stage1``: its first stage1 steps are plain's, bit for bit (tests/test_explicit_attention),
     so the memories come from exactly its stage-1 model; then stage2 steps with memories;
  5. fact accuracy per frequency bucket of plain; of explicit with memories retrieved for each
     question (its prompt's chunks, as generation retrieves); of explicit without memories.

    python bench/explicit_quality.py --quick --out bench/results/explicit_quality-cpu-quick.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from memtron.bench.harness import BYTE_LEVEL
from memtron.cli import main as cli
from memtron.config import load_config
from memtron.data.prepare import prepare
from memtron.data.synthetic import generate_corpus, load_questions
from memtron.data.tokenizer import load_tokenizer
from memtron.export.explicit import size_per_reference
from memtron.infer.explicit import open_explicit
from memtron.infer.model import load_model
from memtron.model.forward import ForwardContext
from memtron.train.facts import bucket_scores, chance_level, choice_logprobs, picked_answer
from memtron.train.trainer import train

REPO = Path(__file__).resolve().parent.parent


def corpus(root: Path, entities: int, docs: int, questions: int, seq_len: int) -> Path:
    generate_corpus(root, n_entities=entities, n_train_docs=docs, n_valid_docs=max(40, docs // 20),
                    seed=0, questions_per_bucket=questions)
    prepare([root / "raw" / "train.jsonl"], root / "train", seq_len=seq_len)
    prepare([root / "raw" / "valid.jsonl"], root / "valid", seq_len=seq_len)
    return root


def overrides(data: Path, shards: Path, run_dir: Path, steps: int, every: int,
              extra: list[str]) -> list[str]:
    return [f"data.train={shards}", f"data.valid={data / 'valid'}",
            f"data.questions={data / 'questions.jsonl'}", f"train.steps={steps}",
            f"train.run_dir={run_dir}", f"checkpoint.every={every}", "checkpoint.keep_last=4",
            "checkpoint.resume=none",
            "train.eval_every=0", "logging.tensorboard=false", "logging.progress=false",
            *BYTE_LEVEL, *extra]


def memory_logits_fn(model, explicit, questions: list[dict], tokenizer, device):
    """logits_fn for choice_logprobs that gives each scored sequence the memories generation
    would: a chunk inside the question's prompt is retrieved with its prompt text, a later one
    with the chunk before it (infer/explicit.py)."""
    contexts = {tuple([tokenizer.eos_id, *tokenizer.encode(q["prompt"])]) for q in questions}
    lengths = sorted({len(c) for c in contexts}, reverse=True)
    chunk = explicit.memories.chunk

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        windows = []
        n_chunks = -(-tokens.shape[1] // chunk)
        for row in tokens.tolist():
            context = next(row[:n] for n in lengths if tuple(row[:n]) in contexts)
            for j in range(n_chunks):
                start = j * chunk
                windows.append(context[start:start + chunk] if start < len(context)
                               else row[start - chunk:start])
        ids = explicit.retrieve(windows).view(tokens.shape[0], n_chunks, explicit.r)
        ctx = ForwardContext(explicit=explicit.memories.kv(ids, device))
        return model(tokens.to(device), ctx).float()

    return logits_fn


def accuracy(logits_fn, tokenizer, questions: list[dict], max_len: int) -> dict:
    correct = picked_answer(questions, choice_logprobs(logits_fn, tokenizer, questions,
                                                       batch_size=64, max_len=max_len))
    return {name: {"correct": s.correct, "n": s.n, "accuracy": s.accuracy, "ci95": [s.low, s.high]}
            for name, s in bucket_scores(questions, correct).items()}


def sizes(store: Path, cfg) -> dict:
    """Bytes per memory (one reference chunk) in the store, of its raw text, and of its dense
    bf16 K/V in the memory layers (every token, not the top m)."""
    manifest = json.loads((store / "manifest.json").read_text())
    meta = manifest["source"]["explicit"]
    references = [json.loads(line) for line in (store / "references.jsonl").read_text()
                  .splitlines() if line.strip()]
    n = meta["n_memories"]
    text = json.loads((store.parent / "raw_bytes.json").read_text())["bytes"] / n
    size = size_per_reference(manifest, text, tokens=text)  # byte tokenizer: a token per byte
    return {"n_memories": n, "n_documents": len(references), "store_dtype": meta["dtype"],
            "m": meta["m"], "ref_len": meta["ref_len"], "layers": meta["layers"],
            "memory_bytes_per_reference": size["memory_bytes"],
            "store_bytes_per_reference": size["store_bytes"],
            "raw_text_bytes_per_reference": text,
            "dense_kv_bytes_per_reference": size["dense_kv_bytes"],
            "model_d_model": cfg.model.d_model}


def run(args: argparse.Namespace, root: Path) -> dict:
    t0 = time.perf_counter()
    data = corpus(root / "corpus", args.entities, args.docs, args.questions, args.seq_len)
    base = [f"data.seq_len={args.seq_len}", *args.override]
    steps = args.stage1 + args.stage2
    plain_dir = root / "plain"
    train(load_config(args.config, overrides(data, data / "train", plain_dir, steps, args.stage1,
                                             base)))
    stage1 = plain_dir / "checkpoints" / f"step-{args.stage1:08d}"
    refs = data / "raw" / "train.jsonl"
    (root / "raw_bytes.json").write_text(json.dumps({"bytes": sum(
        len(json.loads(line)["text"].encode()) for line in refs.read_text().splitlines())}))
    store = root / "store"
    assert cli(["memory", "build-explicit", "--ckpt", str(stage1), "--references", str(refs),
                "--out", str(store), "--m", str(args.m), "--ref-len", str(args.ref_len),
                "--batch-size", "64", "--device", args.device, "--quiet"]) == 0
    shards = root / "train-memory"
    shutil.copytree(data / "train", shards)
    assert cli(["data", "retrieve", "--shards", str(shards), "--store", str(store),
                "--r", str(args.r), "--chunk", str(args.chunk), "--quiet"]) == 0
    explicit_dir = root / "explicit"
    memory = [f"memory.explicit.store={store}", f"memory.explicit.r={args.r}",
              f"memory.explicit.chunk={args.chunk}", f"memory.explicit.start_step={args.stage1}"]
    train(load_config(args.config, overrides(data, shards, explicit_dir, steps, args.stage1,
                                             base + memory)))

    questions = load_questions(data / "questions.jsonl")
    device = torch.device(args.device)
    results = {}
    for arm, run_dir in (("plain", plain_dir), ("explicit", explicit_dir)):
        loaded = load_model(run_dir, device=device)
        tokenizer = load_tokenizer(loaded.config.data.tokenizer)
        max_len = loaded.config.model.max_seq_len

        def plain_fn(tokens, model=loaded.model):
            return model(tokens.to(device)).float()

        name = "plain" if arm == "plain" else "explicit_without_memories"
        results[name] = accuracy(plain_fn, tokenizer, questions, max_len)
        if arm == "explicit":
            explicit = open_explicit(str(store), loaded.config, tokenizer)
            fn = memory_logits_fn(loaded.model, explicit, questions, tokenizer, device)
            results["explicit_with_memories"] = accuracy(fn, tokenizer, questions, max_len)
            results["explicit_fetch"] = explicit.memories.stats()
            cfg = loaded.config
    return {"accuracy": results, "chance": chance_level(questions), "sizes": sizes(store, cfg),
            "params": vars(args), "seconds": time.perf_counter() - t0,
            "host": {"platform": platform.platform(), "torch": torch.__version__,
                     "threads": torch.get_num_threads()}}


def report(result: dict) -> str:
    lines = ["| arm | " + " | ".join(result["accuracy"]["plain"]) + " |",
             "|---|" + "---|" * len(result["accuracy"]["plain"])]
    for arm in ("plain", "explicit_with_memories", "explicit_without_memories"):
        cells = [f"{s['accuracy']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] (n={s['n']})"
                 for s in result["accuracy"][arm].values()]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    s = result["sizes"]
    lines.append(f"chance {result['chance']:.3f}; store: {s['n_memories']} memories, "
                 f"{s['memory_bytes_per_reference']:.0f} B/reference ({s['store_dtype']}, m="
                 f"{s['m']}, layers {s['layers']}) vs raw text "
                 f"{s['raw_text_bytes_per_reference']:.0f} B and dense bf16 KV "
                 f"{s['dense_kv_bytes_per_reference']:.0f} B")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    p.add_argument("--override", action="append", default=[], help="dotted config override")
    p.add_argument("--entities", type=int, default=1000)
    p.add_argument("--docs", type=int, default=8000)
    p.add_argument("--questions", type=int, default=100, help="questions per bucket")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--stage1", type=int, default=600, help="steps without memory")
    p.add_argument("--stage2", type=int, default=600, help="steps with memory")
    p.add_argument("--r", type=int, default=5)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--ref-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="200 entities, 1,500 documents, a 4-layer d_model=64 model, micro-batch "
                   "8, 150 + 150 steps (minutes on a CPU)")
    p.add_argument("--work", help="working directory (default: a temporary one, removed)")
    p.add_argument("--out", help="JSON results file")
    p.add_argument("--smoke", action="store_true", help="a pipeline check, seconds: no result")
    args = p.parse_args(argv)
    if args.quick:
        args.entities, args.docs, args.questions, args.stage1, args.stage2 = 200, 1500, 60, 150, 150
        args.override = ["model.d_model=64", "model.d_ff=192", "memory.value_dim=64",
                         "data.micro_batch_size=8", "optim.warmup_steps=20", *args.override]
    if args.smoke:
        args.entities, args.docs, args.questions, args.stage1, args.stage2 = 40, 120, 5, 4, 4
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.work:
        result = run(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args, Path(tmp))
    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
